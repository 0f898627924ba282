"""Loading tokenizers and causal LMs from local `from_pretrained` folders, LoRA, and saving in Hugging Face format."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_ds.config import LoraConfig
from rlhf_ds.engine import startup, strategy
from rlhf_ds.models.unsharded import adapter_state_dict, is_peft, save_adapter, unsharded_copy
from rlhf_ds.utils import atomic_directory, barrier, is_rank0

PAD_TOKEN = "<|pad|>"  # added as PAD only when the tokenizer has no unused special token (unused_pad_token)
# existing tokens taken as PAD first, in this order (when in no role and not in the chat template)
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<|finetune_right_pad|>",
             "<|pad_token|>", "<PAD>")
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>|<\|reserved_\d+\|>|<unused\d+>|\[unused\d+\]")
# What `from_pretrained` loads weights from (sharded checkpoints through their index), in its order of preference.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
# Any one of these makes a folder hold a tokenizer (vocab.json needs merges.txt next to it; tiktoken files also count).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
_ADDED = "_rlhf_ds_added_tokens"  # tokenizer attribute: how many tokens load_tokenizer added (the PAD), for match_vocab

log = logging.getLogger("rlhf_ds")


class ModelLoadError(ValueError):
    """A model or tokenizer folder that cannot be used, with the path and what is missing."""


def resolve_model_dir(path: str) -> str:
    """A model folder, or a step's run folder holding one under `model/` (what every rlhf_ds step writes)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        inner = os.path.join(path, "model")
        if os.path.isfile(os.path.join(inner, "config.json")):
            return inner
    return path


def _listing(path: str, limit: int = 12) -> str:
    names = sorted(os.listdir(path))
    if not names:
        return " (the folder is empty)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f" (it holds: {', '.join(names[:limit])}{more})"


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{file}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def check_model_dir(path: str, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> None:
    """Refuse, before any weight is read, a folder `from_pretrained` cannot load or that does not fit `tokenizer`:
    no config.json (or an unreadable one), no weights, a missing shard, a truncated or corrupt safetensors file, a
    tokenizer with ids beyond the model's embedding."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"model folder not found: {path} (rlhf_ds loads only local folders)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        inner = " (nor does its model/ folder)" if os.path.isdir(os.path.join(path, "model")) else ""
        raise ModelLoadError(f"{path}: no config.json{inner} — not a Hugging Face model folder{_listing(path)}")
    config = _read_json(os.path.join(path, "config.json"))
    for file in _weight_files(path):
        check_safetensors(file)
    if tokenizer is not None:
        vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        if isinstance(vocab, int):
            check_vocab(tokenizer, vocab, path)


def _weight_files(path: str) -> list[str]:
    """The safetensors files `from_pretrained` will read (shards listed in an index must all exist)."""
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise ModelLoadError(f"{path}: no model weights (one of {', '.join(WEIGHT_FILES)}){_listing(path)}")
    name = present[0]
    if not name.endswith(".index.json"):
        return [os.path.join(path, name)] if name.endswith(".safetensors") else []
    index = _read_json(os.path.join(path, name))
    shards = sorted(set((index.get("weight_map") or {}).values()))
    if not shards:
        raise ModelLoadError(f"{os.path.join(path, name)}: the index lists no weight files (empty weight_map)")
    missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if missing:
        raise ModelLoadError(f"{path}: {len(missing)} of the {len(shards)} weight files listed in {name} are missing: "
                             f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return [os.path.join(path, s) for s in shards if s.endswith(".safetensors")]


def check_safetensors(file: str) -> None:
    """Read only the header of a safetensors file and check the tensors it announces fit in the file."""
    size = os.path.getsize(file)

    def corrupt(why: str) -> ModelLoadError:
        return ModelLoadError(f"{file}: corrupt or truncated safetensors file: {why}; copy or save the model again")

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise corrupt(f"its header claims {n:,} bytes but the file has {size:,}")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise corrupt("its header is not a valid safetensors header") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise corrupt(f"the tensors need {need:,} bytes but the file has {size:,}")


def _has_tokenizer_files(path: str, trust_remote_code: bool) -> bool:
    names = set(os.listdir(path))
    if names.intersection(TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names):
        return True
    return trust_remote_code and "tokenizer_config.json" in names  # custom tokenizer code may bring its own files


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer with a PAD token distinct from EOS.

    PAD == EOS makes the EOS look like padding, so it is masked and the policy never learns to stop. When the tokenizer
    has no PAD or PAD == EOS, an unused special token it already has becomes the PAD (`unused_pad_token`: e.g.
    `<|endoftext|>` of a ChatML model whose EOS is `<|im_end|>`), so the vocabulary and the model's embedding keep
    their size. Only when it has none is a new PAD added (the embedding then grows by one row in `match_vocab`, under
    ZeRO-3 too). A warning names the PAD and why.
    """
    path = resolve_model_dir(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"tokenizer folder not found: {path}")
    if not _has_tokenizer_files(path, trust_remote_code):
        raise ModelLoadError(
            f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}){_listing(path)}; "
            "save the tokenizer next to the model (tokenizer.save_pretrained(folder))"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers, tokenizers and sentencepiece raise many unrelated types here
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {_one_line(err)}") from err
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer has no EOS token; responses could never end")
    added = 0
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        why = "has no PAD token" if tok.pad_token_id is None else f"uses its EOS {tok.eos_token!r} as PAD"
        spare = unused_pad_token(tok, path)
        if spare is not None:
            token, reason = spare
            tok.pad_token = token
            how = (f"(already in the vocabulary): {reason}; the vocabulary and the model's embedding keep their size")
        else:
            before = len(tok)
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
            added = len(tok) - before
            how = ("(a new token: the model's embedding grows by one row)" if added else "(already in the vocabulary)")
            how += (": the tokenizer has no unused special token to take instead (each is BOS, EOS, UNK or another "
                    "role, or appears in the chat template)")
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise ModelLoadError(f"{path}: the tokenizer's EOS is {tok.pad_token!r}; cannot use a distinct PAD token")
        log.warning("%s: the tokenizer %s; PAD == EOS would mask the EOS as padding so the model would never learn to "
                    "stop, so a distinct PAD %r (id %d) is used %s", path, why, tok.pad_token, tok.pad_token_id, how)
    setattr(tok, _ADDED, added)
    tok.padding_side = "left"  # decoder-only generation pads prompts on the left (saved with the tokenizer)
    return tok


def _config_ids(path: str, keys: tuple[str, ...]) -> set[int]:
    """Token ids named by `keys` (int or list) in the folder's config.json (and its text_config) and
    generation_config.json; unreadable files count as naming none (check_model_dir reports them later)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        for section in (cfg, cfg.get("text_config")) if isinstance(cfg, dict) else ():
            for key in keys if isinstance(section, dict) else ():
                value = section.get(key)
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, int) and not isinstance(v, bool):
                        ids.add(v)
    return ids


def _chat_templates(tok: PreTrainedTokenizerBase) -> list[str]:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        return [t for t in template.values() if isinstance(t, str)]
    if isinstance(template, list):  # [{"name": ..., "template": ...}] in some saved configs
        return [t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
    return [template] if isinstance(template, str) else []


def _model_vocab_size(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) else None


def unused_pad_token(tok: PreTrainedTokenizerBase, path: str = "") -> Optional[tuple[str, str]]:
    """(token, why) of a token the tokenizer already has that can serve as PAD, or None.

    Candidates are the tokenizer's special added tokens and PAD-named tokens of its vocabulary (PAD_NAMES). Refused:
    a token in a role (BOS, EOS, UNK unless `never_emits_unk`, SEP, CLS, MASK, or a model-specific one such as an
    image token), a BOS/EOS id
    of the folder's config.json or generation_config.json (models that stop on several ids), a token whose text
    appears in the chat template (it is written into every conversation), and an id beyond the model's embedding.
    Preferred: a PAD-named token, then a reserved special token, then the lowest id."""
    vocab = tok.get_vocab()
    limit = _model_vocab_size(path) if path else None
    free_unk = never_emits_unk(tok)  # byte-level BPE: UNK is a name only (SmolLM2's <|endoftext|>)
    roles = {name: value for name, value in (tok.special_tokens_map or {}).items()
             if name != "pad_token" and isinstance(value, str) and not (free_unk and name == "unk_token")}
    taken_ids = {vocab[t] for t in roles.values() if t in vocab}
    unk = None if free_unk else getattr(tok, "unk_token_id", None)
    taken_ids |= {i for i in (tok.bos_token_id, tok.eos_token_id, unk) if i is not None}
    taken_ids |= _config_ids(path, ("bos_token_id", "eos_token_id")) if path else set()
    templates = _chat_templates(tok)

    def usable(token: str) -> bool:
        i = vocab.get(token)
        return (bool(token) and i is not None and i not in taken_ids and (limit is None or i < limit)
                and not any(token in t for t in templates))

    for name in PAD_NAMES:
        if usable(name):
            return name, "a PAD-named token of the vocabulary, in no role and not in the chat template"
    special = sorted((i, str(t)) for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()
                     if getattr(t, "special", False))
    specials = [t for _, t in special if usable(t)]
    for token in specials:
        if RESERVED_TOKEN.fullmatch(token):
            return token, "a reserved special token, in no role and not in the chat template"
    if specials and specials[0] == tok.unk_token:
        return specials[0], "the tokenizer's UNK, which its byte-level BPE never produces (not in the chat template)"
    if specials:
        return specials[0], ("an unused special token of the tokenizer (in no role such as BOS, EOS or UNK, and not in "
                             "the chat template)")
    return None


def never_emits_unk(tok: PreTrainedTokenizerBase) -> bool:
    """Whether encoding can never give the UNK token: a byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) spells any text
    in byte tokens, so its UNK, if it names one, is an unused special token."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, AttributeError):
        return False
    parts = [spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}]
    parts += [p for part in list(parts) for p in (part.get("pretokenizers") or part.get("decoders") or [])]
    return spec.get("model", {}).get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in parts)


def tokenizer_span(tokenizer: PreTrainedTokenizerBase) -> int:
    """Rows an embedding needs for every id of `tokenizer` (its size, or its largest id + 1 when ids have gaps)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def max_positions(config) -> Optional[int]:
    """The positions a model config allows (None when it names none)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pick_device(name: str = "auto") -> str:
    """The device of a one-process tool (eval, score, serve-reward): "auto" = the accelerator DeepSpeed detects."""
    if name != "auto":
        return name
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def check_vocab(tokenizer: PreTrainedTokenizerBase, n_embed: int, path: str) -> None:
    """Refuse a tokenizer whose ids do not all have an embedding row, beyond the PAD load_tokenizer added."""
    span, added = tokenizer_span(tokenizer), getattr(tokenizer, _ADDED, 0)
    if span <= n_embed + added:
        return
    source = getattr(tokenizer, "name_or_path", "") or "?"
    ours = f", {added} of them the PAD added by rlhf_ds" if added else ""
    raise ModelLoadError(
        f"{path}: vocabulary mismatch: the tokenizer ({source}) has {span:,} token ids{ours} but the model's embedding "
        f"has {n_embed:,} rows (config.json vocab_size), so ids {n_embed:,} and up have no embedding; the tokenizer "
        "belongs to another model — use the tokenizer saved with this model"
    )


def _no_dropout_kwargs(config) -> dict:
    """Config overrides that zero every dropout probability (RL needs ratio == 1 at the first step)."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            out[key] = 0.0
    return out


def load_pretrained(
    auto_class,
    path: str,
    ds_config: dict,
    precision: str = "fp32",
    disable_dropout: bool = False,
    trust_remote_code: bool = False,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
) -> tuple[torch.nn.Module, str]:
    """`auto_class.from_pretrained` of a local folder, partitioned at construction under ZeRO-3; returns the model and
    the resolved folder. Weights load as safetensors where present (torch files only with weights_only)."""
    path = resolve_model_dir(path)
    startup.phase(f"loading {path}")
    check_model_dir(path, tokenizer)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: cannot read config.json: {_one_line(err)}") from err
    kwargs = _no_dropout_kwargs(config) if disable_dropout else {}
    try:
        with strategy.model_construction(ds_config):
            model = auto_class.from_pretrained(
                path, dtype=strategy.torch_dtype(precision), trust_remote_code=trust_remote_code, **kwargs
            )
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"{path}: cannot load the weights: {_one_line(err)}") from err
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        raise ModelLoadError(f"{path}: the weights do not match config.json (tensor shapes differ; the load report "
                             f"above names them): {_one_line(err)}") from err
    if tokenizer is not None:
        match_vocab(model, tokenizer, path, ds_config)
    return model, path


def load_causal_lm(path: str, ds_config: dict, precision: str = "fp32", disable_dropout: bool = False,
                   trust_remote_code: bool = False, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> torch.nn.Module:
    """A causal LM (policy, reference) from a local folder."""
    return load_pretrained(AutoModelForCausalLM, path, ds_config, precision, disable_dropout, trust_remote_code,
                           tokenizer)[0]


def match_vocab(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str,
                ds_config: Optional[dict] = None) -> None:
    """Grow the embedding for tokens the loader added (PAD), ZeRO-3-partitioned or not; refuse a tokenizer that does
    not fit the model. Records the PAD and EOS in the model's configs (saved with it)."""
    n_embed = model.config.vocab_size
    check_vocab(tokenizer, n_embed, path)
    span = tokenizer_span(tokenizer)
    if span > n_embed:
        grow_embeddings(model, span, ds_config or {})
        log.info("%s: embedding grown from %d to %d rows for the added PAD token", path, n_embed, span)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    try:
        embed = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # custom (remote-code) models may not say
        embed = None
    if isinstance(embed, torch.nn.Embedding) and embed.padding_idx is not None:
        # built from config.json's pad_token_id (the EOS when PAD == EOS: its row would get no gradient); a reload of
        # the saved model builds it from the PAD recorded above, so this run trains the same way
        embed.padding_idx = tokenizer.pad_token_id


def grow_embeddings(model: torch.nn.Module, rows: int, ds_config: dict) -> None:
    """Grow the input embedding (and an untied output layer) to `rows` rows; old rows are kept, new rows (and output
    biases) are the mean of the old ones.

    Under ZeRO-3 the parameters are partitioned (a weight's local shape is its shard), which transformers'
    `resize_token_embeddings` cannot read outside `HfDeepSpeedConfig`; here the old weights are gathered on every rank,
    the new layers are built partitioned (`zero.Init` with this model's DeepSpeed config, on the device and in the
    dtype it chooses, like the scalar heads) and filled by rank 0, so the model stays uniformly partitioned; full
    copies of the old and new layers exist only inside the gather. A tied output layer keeps sharing the input
    weight."""
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    partitioned = strategy.is_partitioned(embed.weight)
    if not isinstance(embed, torch.nn.Embedding) or (out is not None and not isinstance(out, torch.nn.Linear)):
        if partitioned:
            raise ModelLoadError(f"{type(model).__name__}: cannot grow its embedding ({type(embed).__name__}) under "
                                 "ZeRO-3 for the added PAD token; use engine.zero_stage=0 or give the tokenizer a PAD")
        model.resize_token_embeddings(rows)
        return
    tied = out is not None and out.weight is embed.weight
    old_out = [] if out is None else ([out.bias] if tied else [out.weight, out.bias])
    old_params = [p for p in [embed.weight, *old_out] if p is not None]
    build = strategy.zero3_init(ds_config) if partitioned else contextlib.nullcontext()
    dim, where = embed.embedding_dim, {} if partitioned else {"device": embed.weight.device}
    with build:
        new_embed = torch.nn.Embedding(rows, dim, padding_idx=embed.padding_idx, dtype=embed.weight.dtype, **where)
        new_out = None
        if out is not None and not (tied and out.bias is None):
            new_out = torch.nn.Linear(dim, rows, bias=out.bias is not None, dtype=out.weight.dtype, **where)
    new_params = [new_embed.weight] + ([] if new_out is None else [p for p in new_out.parameters()])
    with strategy.gathered(old_params), strategy.gathered(new_params, modifier_rank=0), torch.no_grad():
        _keep_rows(new_embed.weight, embed.weight)
        if new_out is not None:
            if not tied:
                _keep_rows(new_out.weight, out.weight)
            if out.bias is not None:
                _keep_rows(new_out.bias, out.bias)
    model.set_input_embeddings(new_embed)
    if out is not None:
        if new_out is None:  # tied, no bias: the same layer on the new weight
            out.weight = new_embed.weight
            out.out_features = rows
        else:
            if tied:
                new_out.weight = new_embed.weight
            model.set_output_embeddings(new_out)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config.vocab_size = rows
    if config is not model.config:
        model.config.vocab_size = rows
    if hasattr(model, "vocab_size"):
        model.vocab_size = rows


def _keep_rows(new: torch.Tensor, old: torch.Tensor) -> None:
    """`new`'s first rows := `old`, the others := the mean of `old`'s rows (in place, full tensors)."""
    n = old.shape[0]
    new[:n].copy_(old)
    new[n:] = old.float().mean(dim=0).to(new.dtype)


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for group in (["c_attn", "c_proj", "c_fc"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]):
        found = [g for g in group if g in names]
        if found:
            return found
    raise ValueError("cannot guess LoRA target modules for this architecture; set engine.lora.target_modules")


def apply_lora(model: torch.nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap with peft LoRA; base weights are frozen, only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules or default_lora_targets(model)
    is_gpt2_conv1d = getattr(model.config, "model_type", "") == "gpt2"
    cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=is_gpt2_conv1d,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts, using ZeRO-3's full sizes for partitioned parameters."""
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_causal_lm(model: torch.nn.Module, tokenizer, out_dir: str, extra: Optional[dict] = None) -> None:
    """Hugging Face folder loadable with no rlhf_ds import; with LoRA the merged model plus `adapter/` (peft alone).

    Collective (ZeRO-3 gather); rank 0 writes into a temp folder that replaces `out_dir` in one rename.
    """
    plain = unsharded_copy(model, device="cpu", all_ranks=False)
    adapter = adapter_state_dict(model) if is_peft(model) else None
    if is_rank0():
        with atomic_directory(out_dir) as tmp:
            if adapter is not None:
                save_adapter(model, adapter, os.path.join(tmp, "adapter"))
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if extra:
                with open(os.path.join(tmp, "rlhf_ds.json"), "w", encoding="utf-8") as f:
                    json.dump(extra, f, indent=2)
    barrier()
