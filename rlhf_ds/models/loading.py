"""Loading tokenizers and causal LMs from local `from_pretrained` folders, LoRA, and saving in Hugging Face format."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_ds.config import LoraConfig
from rlhf_ds.engine import strategy
from rlhf_ds.models.unsharded import adapter_state_dict, is_peft, save_adapter, unsharded_copy
from rlhf_ds.utils import atomic_directory, barrier, is_rank0

PAD_TOKEN = "<|pad|>"


class ModelLoadError(ValueError):
    """A model or tokenizer folder that cannot be used, with the path and what is missing."""


def resolve_model_dir(path: str) -> str:
    """A model folder, or a step's run folder holding one under `model/` (what every rlhf_ds step writes)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        inner = os.path.join(path, "model")
        if os.path.isfile(os.path.join(inner, "config.json")):
            return inner
    return path


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ModelLoadError(f"model folder not found: {path} (rlhf_ds loads only local folders)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path}: no config.json — not a Hugging Face model folder")
    weights = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")]
    if not weights:
        raise ModelLoadError(f"{path}: no weights (*.safetensors or pytorch_model.bin)")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer with a PAD token distinct from EOS.

    PAD == EOS makes the EOS look like padding, so it is masked and the policy never learns to stop; a dedicated PAD
    is added instead (the model's embedding is resized by `load_causal_lm` when needed).
    """
    path = resolve_model_dir(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"tokenizer folder not found: {path}")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer has no EOS token; responses could never end")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"  # decoder-only generation pads prompts on the left (saved with the tokenizer)
    return tok


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
    check_model_dir(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = _no_dropout_kwargs(config) if disable_dropout else {}
    with strategy.model_construction(ds_config):
        model = auto_class.from_pretrained(
            path, dtype=strategy.torch_dtype(precision), trust_remote_code=trust_remote_code, **kwargs
        )
    if tokenizer is not None:
        match_vocab(model, tokenizer, path)
    return model, path


def load_causal_lm(path: str, ds_config: dict, precision: str = "fp32", disable_dropout: bool = False,
                   trust_remote_code: bool = False, tokenizer: Optional[PreTrainedTokenizerBase] = None) -> torch.nn.Module:
    """A causal LM (policy, reference) from a local folder."""
    return load_pretrained(AutoModelForCausalLM, path, ds_config, precision, disable_dropout, trust_remote_code,
                           tokenizer)[0]


def match_vocab(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    """Grow the embedding for tokens the loader added (PAD); refuse a tokenizer that does not fit the model."""
    n_embed = model.config.vocab_size
    if len(tokenizer) > n_embed:
        if len(tokenizer) - n_embed > 8:
            raise ModelLoadError(
                f"{path}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_embed}; "
                "they do not belong together"
            )
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


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
