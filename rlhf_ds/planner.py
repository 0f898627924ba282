"""Memory planner for RLHF jobs on DeepSpeed.

Estimates, per GPU and per node's CPU, the bytes each of the (up to) four PPO models
needs -- weights, gradients, optimizer states (fp32 master copy + moments),
activations, KV cache, the hybrid engine's gathered actor copy and DeepSpeed's
communication buffers -- and whether the job fits.  ``recommend`` searches cheaper to
more expensive memory-saving settings and returns the first that fits.

Every formula is documented in ``docs/planner.md``.  Units: bytes everywhere; reports
print GB = 1e9 bytes (and GiB = 2**30 where noted).

Nothing here imports torch or deepspeed except ``ModelSpec.from_pretrained_dir(...,
exact=True)`` (meta-device parameter count), so planning is instant.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from rlhf_ds.config import EngineConfig, HybridConfig

GB = 1e9
GIB = float(2**30)

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: bytes per trained parameter of optimizer moments (Adam exp_avg + exp_avg_sq)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}
MASTER_BYTES = 4  # fp32 master copy
ROLES = ("actor", "critic", "reference", "reward")
#: bitsandbytes keeps tensors smaller than this (numel) in 32-bit state (its ``min_8bit_size``).
BNB_MIN_8BIT_SIZE = 4096
#: DeepSpeed ZeRO-1/2 pads the flat buffer to a multiple of this times the world size.
ZERO12_ALIGNMENT = 2

Tensor = Tuple[str, Tuple[int, ...]]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    hidden: int
    vocab: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    gated: bool  # SwiGLU-style MLP (gate/up/down) instead of fc -> act -> proj
    dropout: bool  # GPT-2 style dropout masks in attention/MLP outputs
    inferred: bool  # dims guessed from a bare parameter count


@dataclass(frozen=True)
class ModelSpec:
    """A model's size: a parameter count, architecture dimensions, or both.

    With only ``n_params`` the planner is exact for model states and guesses a
    LLaMA-shaped architecture (documented in docs/planner.md) for activations, KV cache,
    LoRA sizes and the largest layer.  With dimensions it lays out every tensor the way
    Hugging Face does (``arch`` ``"gpt2"`` or ``"llama"``: LLaMA/Mistral/Qwen2 family).
    ``tensors`` (name, shape) in ``model.parameters()`` order makes it exact for any
    architecture (``from_pretrained_dir(..., exact=True)`` fills it from a meta model).
    ``n_params``, when given, always wins as the parameter count.
    """

    n_params: Optional[int] = None
    n_layers: Optional[int] = None
    hidden: Optional[int] = None
    vocab: Optional[int] = None
    intermediate: Optional[int] = None  # default 4*hidden (gpt2) / round_up(8*hidden/3, 256) (llama)
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None  # default n_heads
    head_dim: Optional[int] = None  # default hidden // n_heads
    tie_embeddings: bool = False
    arch: str = "llama"  # "llama" | "gpt2" | "exact" (tensors given)
    max_positions: int = 1024  # gpt2 learned position embeddings
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    largest_layer_params: Optional[int] = None  # override (DeepSpeed's "largest layer")
    tensors: Optional[Tuple[Tensor, ...]] = None
    value_head: Optional[bool] = None  # None: yes for critic/reward roles
    name: str = ""

    def __post_init__(self):
        if self.arch not in ("llama", "gpt2", "exact"):
            raise ValueError(f"ModelSpec.arch must be 'llama', 'gpt2' or 'exact', got {self.arch!r}")
        if self.tensors is None and self.n_params is None and not self._has_dims():
            raise ValueError("ModelSpec needs n_params, or n_layers/hidden/vocab/n_heads, or tensors")
        if self.n_params is not None and int(self.n_params) <= 0:
            raise ValueError(f"n_params must be positive, got {self.n_params}")

    def _has_dims(self) -> bool:
        return all(v is not None for v in (self.n_layers, self.hidden, self.vocab, self.n_heads))

    # -- derived -------------------------------------------------------------
    @property
    def layout_known(self) -> bool:
        """True when the exact tensor layout is known (dims or tensors, not guessed)."""
        return self.tensors is not None or self._has_dims()

    @property
    def total_params(self) -> int:
        if self.n_params is not None:
            return int(self.n_params)
        return sum(_numel(s) for _, s in _layout(self))

    def dims(self) -> _Dims:
        return _dims(self)

    def layout(self) -> Tuple[Tensor, ...]:
        """(name, shape) of every parameter, guessed from ``dims()`` when not known."""
        return _layout(self)

    def largest_layer(self) -> int:
        """Parameters of the largest module (its own params only), as DeepSpeed counts it."""
        if self.largest_layer_params is not None:
            return int(self.largest_layer_params)
        return _largest_module(_layout(self))

    def with_value_head(self) -> "ModelSpec":
        """Critic/reward form: the LM head is replaced by a (1 x hidden) value head."""
        return dataclasses.replace(self, value_head=True)

    @classmethod
    def from_param_count(cls, text: Union[str, float, int], **kw) -> "ModelSpec":
        return cls(n_params=parse_param_count(text), name=kw.pop("name", str(text)), **kw)

    @classmethod
    def from_pretrained_dir(cls, path: str, exact: bool = False, trust_remote_code: bool = False) -> "ModelSpec":
        """Read ``config.json`` from a local Hugging Face model folder (weights are not loaded).

        GPT-2 and LLaMA/Mistral/Qwen2 configs are counted from their dimensions; any other
        model type (or ``exact=True``) is built with ``AutoModelForCausalLM.from_config``
        on the ``meta`` device and its parameters are listed exactly.
        """
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        name = os.path.basename(os.path.normpath(path))
        mt = cfg.get("model_type", "")
        if not exact and mt == "gpt2":
            return cls(n_layers=cfg["n_layer"], hidden=cfg["n_embd"], vocab=cfg["vocab_size"],
                       intermediate=cfg.get("n_inner") or None, n_heads=cfg["n_head"],
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), arch="gpt2",
                       max_positions=int(cfg.get("n_positions", 1024)), name=name)
        if not exact and mt in ("llama", "mistral", "qwen2"):
            attn_bias = bool(cfg.get("attention_bias", False))
            return cls(n_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], vocab=cfg["vocab_size"],
                       intermediate=cfg["intermediate_size"], n_heads=cfg["num_attention_heads"],
                       n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                       head_dim=cfg.get("head_dim") or None,
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), arch="llama",
                       qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias,
                       mlp_bias=bool(cfg.get("mlp_bias", False)), name=name)
        return cls._from_meta(path, cfg, name, trust_remote_code)

    @classmethod
    def _from_meta(cls, path, cfg, name, trust_remote_code) -> "ModelSpec":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=trust_remote_code)
        tensors = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())  # tied params once
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

        def get(*keys, default=None):
            for k in keys:
                v = cfg.get(k)
                if v is not None:
                    return v
            return default

        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        return cls(n_layers=get("num_hidden_layers", "n_layer"), hidden=hidden, vocab=get("vocab_size"),
                   intermediate=get("intermediate_size", "n_inner", "ffn_dim"), n_heads=heads,
                   n_kv_heads=get("num_key_value_heads", default=heads), head_dim=get("head_dim"),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), arch="exact",
                   largest_layer_params=int(largest), tensors=tensors, name=name)


def parse_param_count(text: Union[str, float, int]) -> int:
    """'7B', '7e9', '1.3b', '350M', '7000000000' -> int."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (use e.g. 7B, 7e9, 350M)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))


@lru_cache(maxsize=None)
def _dims(spec: ModelSpec) -> _Dims:
    if spec._has_dims():
        h, a = int(spec.hidden), int(spec.n_heads)
        kv = int(spec.n_kv_heads or a)
        hd = int(spec.head_dim or h // a)
        gpt2 = spec.arch == "gpt2"
        gated = not gpt2
        if spec.tensors is not None:
            gated = any(n.endswith("gate_proj.weight") for n, _ in spec.tensors)
        inter = spec.intermediate or (4 * h if not gated else _round_up(8 * h / 3, 256))
        return _Dims(int(spec.n_layers), h, int(spec.vocab), int(inter), a, kv, hd, gated, gpt2, False)
    # Guess a LLaMA-shaped model of ~n_params: n_layers ~= hidden / 128 (LLaMA 7B/13B/33B),
    # 12*L*h^2 parameters in the blocks, hidden rounded to a multiple of 256, 32000 vocabulary,
    # untied head, head_dim 128.
    p = spec.total_params
    h = max(256, 256 * int(round((128 * p / 12) ** (1 / 3) / 256)))
    vocab = 32000
    inter = _round_up(8 * h / 3, 256)
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, int(round((p - 2 * vocab * h) / per_layer)))
    return _Dims(layers, h, vocab, inter, h // 128, h // 128, 128, True, False, True)


@lru_cache(maxsize=None)
def _layout(spec: ModelSpec) -> Tuple[Tensor, ...]:
    if spec.tensors is not None:
        tensors = list(spec.tensors)
    else:
        d = _dims(spec)
        h, inter, v = d.hidden, d.intermediate, d.vocab
        tensors = []
        if spec.arch == "gpt2" and not d.inferred:
            tensors += [("transformer.wte.weight", (v, h)), ("transformer.wpe.weight", (spec.max_positions, h))]
            for i in range(d.n_layers):
                p = f"transformer.h.{i}."
                tensors += [(p + "ln_1.weight", (h,)), (p + "ln_1.bias", (h,)),
                            (p + "attn.c_attn.weight", (h, 3 * h)), (p + "attn.c_attn.bias", (3 * h,)),
                            (p + "attn.c_proj.weight", (h, h)), (p + "attn.c_proj.bias", (h,)),
                            (p + "ln_2.weight", (h,)), (p + "ln_2.bias", (h,)),
                            (p + "mlp.c_fc.weight", (h, inter)), (p + "mlp.c_fc.bias", (inter,)),
                            (p + "mlp.c_proj.weight", (inter, h)), (p + "mlp.c_proj.bias", (h,))]
            tensors += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
        else:
            q, kvd = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
            tensors.append(("model.embed_tokens.weight", (v, h)))
            for i in range(d.n_layers):
                p = f"model.layers.{i}."
                for proj, out_f, in_f, bias in (("q_proj", q, h, spec.qkv_bias), ("k_proj", kvd, h, spec.qkv_bias),
                                                ("v_proj", kvd, h, spec.qkv_bias), ("o_proj", h, q, spec.o_bias)):
                    tensors.append((f"{p}self_attn.{proj}.weight", (out_f, in_f)))
                    if bias:
                        tensors.append((f"{p}self_attn.{proj}.bias", (out_f,)))
                for proj, out_f, in_f in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
                    tensors.append((f"{p}mlp.{proj}.weight", (out_f, in_f)))
                    if spec.mlp_bias:
                        tensors.append((f"{p}mlp.{proj}.bias", (out_f,)))
                tensors += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
            tensors.append(("model.norm.weight", (h,)))
        if not spec.tie_embeddings:
            tensors.append(("lm_head.weight", (v, h)))
    if spec.value_head:
        h = _dims(spec).hidden
        tensors = [t for t in tensors if not t[0].startswith("lm_head.")] + [("v_head.weight", (1, h))]
    return tuple(tensors)


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _largest_module(tensors: Sequence[Tensor]) -> int:
    per_module: Dict[str, int] = {}
    for n, s in tensors:
        m = _module_of(n)
        per_module[m] = per_module.get(m, 0) + _numel(s)
    return max(per_module.values()) if per_module else 0


_EMBEDDING_HINTS = ("wte", "wpe", "embed_tokens", "embed_positions", "word_embeddings")
_HEAD_HINTS = ("lm_head", "v_head", "score", "embed_out")


def default_lora_targets(spec: ModelSpec) -> Tuple[str, ...]:
    names = {n for n, _ in _layout(spec)}
    if spec.arch == "gpt2" or any(n.endswith("c_attn.weight") for n in names):
        return ("c_attn",)
    if any(n.endswith("q_proj.weight") for n in names):
        return ("q_proj", "v_proj")
    if any(n.endswith("query_key_value.weight") for n in names):
        return ("query_key_value",)
    return ("all-linear",)


def _lora_matches(module: str, targets: Sequence[str]) -> bool:
    if "all-linear" in targets:
        leaf = module.rsplit(".", 1)[-1]
        return not any(h in leaf for h in _EMBEDDING_HINTS + _HEAD_HINTS)
    return any(module == t or module.endswith("." + t) for t in targets)


@lru_cache(maxsize=None)
def _lora_tensors(spec: ModelSpec, rank: int, targets: Tuple[str, ...]) -> Tuple[Tensor, ...]:
    """Adapter tensors (peft order: lora_A then lora_B per wrapped module, module order)."""
    out: List[Tensor] = []
    conv1d = spec.arch == "gpt2"  # GPT-2 Conv1D stores (in, out); nn.Linear stores (out, in)
    for n, s in _layout(spec):
        if len(s) != 2 or not n.endswith(".weight"):
            continue
        module = _module_of(n)
        if not _lora_matches(module, targets):
            continue
        in_f, out_f = (s[0], s[1]) if conv1d else (s[1], s[0])
        out += [(module + ".lora_A.weight", (rank, in_f)), (module + ".lora_B.weight", (out_f, rank))]
    if not out:
        raise ValueError(f"LoRA target modules {list(targets)} match no 2-D weight of {spec.name or 'the model'}")
    return tuple(out)


@dataclass(frozen=True)
class TrainSettings:
    """How one model is run.  ``trained`` defaults to True for actor/critic, False otherwise."""

    role: str = "actor"
    trained: Optional[bool] = None
    zero_stage: int = 3
    precision: str = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    lora_rank: int = 0
    lora_target_modules: Optional[Tuple[str, ...]] = None
    lora_trainable_params: Optional[int] = None  # give the adapter size directly ...
    lora_trainable_fraction: Optional[float] = None  # ... or as a fraction of the base model
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    # hybrid.tp_size: ranks of a node that decode together, each holding a tensor-parallel slice of the actor's
    # generation copy (DeepSpeed AutoTP, rlhf_ds/rollout/tensor_parallel.py); 1 = a whole copy per rank. Actor only.
    tp_size: int = 1

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.trained is None:
            object.__setattr__(self, "trained", self.role in ("actor", "critic"))
        if self.lora_target_modules is not None and not isinstance(self.lora_target_modules, tuple):
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_BYTES)}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {self.optimizer!r}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (DeepSpeed offloads parameters only under ZeRO-3)")
        if self.offload_optimizer and self.trained and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (ZeRO-Offload)")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be >= 0")
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if self.tp_size > 1 and self.role != "actor":
            raise ValueError(f"tp_size (hybrid.tp_size) splits the actor's generation copy; the {self.role} does "
                             f"not generate (got tp_size={self.tp_size})")

    @property
    def uses_lora(self) -> bool:
        return bool(self.trained) and (self.lora_rank > 0 or self.lora_trainable_params is not None
                                       or self.lora_trainable_fraction is not None)


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0
    cpu_memory_gb: float = 1000.0  # per node
    gpu_reserved_gb: float = 1.0  # CUDA context, NCCL, allocator slack (not in any category)

    def __post_init__(self):
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ValueError("gpus_per_node and nodes must be >= 1")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Workload:
    """Per-GPU sizes.  ``generation_batch`` defaults to ``micro_batch``."""

    micro_batch: int = 1
    prompt_len: int = 256
    response_len: int = 256
    generation_batch: Optional[int] = None
    flash_attention: bool = True  # SDPA/flash: no (seq x seq) attention matrix is stored
    generate: bool = True  # PPO rollout (hybrid-engine generation) phase present
    # log-probs from the last hidden states this many tokens at a time (engine.logit_chunk_tokens; 0 = whole logits)
    logit_chunk_tokens: int = 1024

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def gen_batch(self) -> int:
        return self.generation_batch if self.generation_batch is not None else self.micro_batch


@dataclass(frozen=True)
class DeepSpeedKnobs:
    """DeepSpeed settings that size buffers (defaults = what rlhf_ds's `engine.*` keys give DeepSpeed, else
    DeepSpeed's own, v0.19)."""

    reduce_bucket_size: int = EngineConfig.reduce_bucket_size  # elements, engine.reduce_bucket_size
    # elements, engine.allgather_bucket_size (ZeRO-1/2 all-gather is in place: no buffer)
    allgather_bucket_size: int = EngineConfig.allgather_bucket_size
    prefetch_bucket_size: int = EngineConfig.zero3_prefetch_bucket_size  # elements, engine.zero3_prefetch_bucket_size
    max_live_parameters: int = EngineConfig.zero3_max_live_parameters  # elements, engine.zero3_max_live_parameters
    max_reuse_distance: int = EngineConfig.zero3_max_reuse_distance  # elements, engine.zero3_max_reuse_distance
    # elements, ZeRO-3 stage3_param_persistence_threshold: rlhf_ds's engine.zero3_param_persistence_threshold
    param_persistence_threshold: int = EngineConfig.zero3_param_persistence_threshold
    sub_group_size: int = int(1e9)  # elements, ZeRO-3 optimizer step granularity
    # engine.overlap_comm (ZeRO-1/2: a second reduce bucket); None: DeepSpeed's default (True only for ZeRO-3)
    overlap_comm: Optional[bool] = EngineConfig.overlap_comm
    contiguous_gradients: bool = True
    zero_init: bool = True  # ZeRO-3 models built under deepspeed.zero.Init
    load_bytes_per_param: int = 4  # CPU bytes/param while a rank materialises a model (fp32, as DeepSpeed)
    stage0_allreduce_bucket: int = int(5e8)  # engine.allreduce_gradients bucket (ZeRO-0)
    # parameter tensors gathered at once while the generation copy is synced from the ZeRO-3 shards
    # (rlhf_ds's hybrid.gather_group_size)
    gather_group_size: int = HybridConfig.gather_group_size


# --------------------------------------------------------------------------- per-model math

GPU_CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "kv_cache", "gathered_params", "buffers")
CPU_CATEGORIES = ("weights", "gradients", "optimizer_states", "buffers")


def activation_bytes_per_layer(batch: int, seq: int, dims: _Dims, act_bytes: int, flash: bool) -> float:
    """Bytes one transformer layer keeps for backward (Korthikanti et al. 2022, generalised).

    With 16-bit activations, for GPT-2 (kv = h, I = 4h, dropout) this is the standard
    ``s*b*h*(34 + 5*a*s/h)``; see docs/planner.md for each term.
    """
    b, s, h = batch, seq, dims.hidden
    kv = dims.n_kv_heads * dims.head_dim
    q = dims.n_heads * dims.head_dim
    drop = 1 if dims.dropout else 0
    attn = b * s * (2 * h + 2 * q + 4 * kv + 2 * q + drop * h)
    if not flash:
        attn += (5 if dims.dropout else 2) * dims.n_heads * b * s * s
    if dims.gated:
        mlp = b * s * (2 * h + 8 * dims.intermediate)
    else:
        mlp = b * s * (2 * h + 4 * dims.intermediate + drop * h)
    norms = 4 * b * s * h
    return (attn + mlp + norms) * act_bytes / 2.0


def logit_bytes(tokens: int, logit_width: int, act_bytes: int, chunk: int = 0) -> int:
    """The logits a forward holds at once: every token's (and an fp32 copy for the log-softmax), or, chunked
    (`chunk` > 0, a causal LM's log-probs from its hidden states), one chunk's, with its fp32 softmax too."""
    if chunk > 0 and logit_width > 1:
        return min(tokens, chunk) * logit_width * (act_bytes + 8)
    return tokens * logit_width * (act_bytes + 4)


def training_activation_bytes(batch: int, seq: int, dims: _Dims, act_bytes: int, flash: bool,
                              checkpointing: bool, logit_width: int, logit_chunk: int = 0) -> int:
    per_layer = activation_bytes_per_layer(batch, seq, dims, act_bytes, flash)
    logits = logit_bytes(batch * seq, logit_width, act_bytes, logit_chunk)
    if checkpointing:
        kept = dims.n_layers * batch * seq * dims.hidden * act_bytes + per_layer
    else:
        kept = dims.n_layers * per_layer + batch * seq * dims.hidden * act_bytes
    return int(kept + logits)


def inference_activation_bytes(batch: int, seq: int, dims: _Dims, act_bytes: int, flash: bool,
                               logit_width: int, logit_chunk: int = 0) -> int:
    """no_grad forward over the full sequence: one layer's working set plus the logits."""
    per_layer = activation_bytes_per_layer(batch, seq, dims, act_bytes, flash)
    return int(per_layer + logit_bytes(batch * seq, logit_width, act_bytes, logit_chunk))


def kv_cache_bytes(batch: int, seq: int, dims: _Dims, dtype_bytes: int) -> int:
    return int(2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * batch * seq * dtype_bytes)


# --------------------------------------------------------------------------- tensor-parallel generation copy

#: families whose generation copy can be tensor-parallel (rlhf_ds.rollout.tensor_parallel.TP_FAMILIES; repeated here
#: because the planner imports no torch): LLaMA-style layouts (``ModelSpec.arch == "llama"``)
TP_FAMILIES = ("llama", "mistral", "qwen2")
#: tp_size values ``recommend`` tries (those dividing gpus_per_node)
TP_SIZES = (1, 2, 4, 8)
#: DeepSpeed inference's ``tensor_parallel.tp_grain_size`` default (deepspeed/inference/config.py, v0.19): AutoTP
#: splits MLP and LM-head dimensions in grains of this many features
AUTOTP_GRAIN = 64

_TP_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output features (dim 0, + bias)
_TP_ROW = ("o_proj", "down_proj", "lm_head")  # split by input features (dim 1; bias whole)
_TP_BY_HEADS = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention: split on kv-head boundaries


def autotp_shard_sizes(total: int, tp: int, kv_heads: Optional[int] = None, by_heads: bool = True) -> List[int]:
    """How DeepSpeed AutoTP (v0.19, ``module_inject.tp_shard.get_shard_size_list``, inference defaults) splits a
    dimension of ``total`` features over ``tp`` ranks: attention projections on kv-head boundaries (rank r gets
    kv//tp heads' worth, one more while r < kv % tp); MLP and LM head in grains of 64 (rank r gets grains//tp, one more
    while r < grains % tp, the last rank also the < 64 remainder). Index = rank within the TP group."""
    if tp == 1:
        return [int(total)]
    if kv_heads and by_heads and total % kv_heads == 0:
        return [total * (kv_heads // tp + (1 if r < kv_heads % tp else 0)) // kv_heads for r in range(tp)]
    if total >= AUTOTP_GRAIN:
        grains, rem = divmod(total, AUTOTP_GRAIN)
        sizes = [(grains // tp + (1 if r < grains % tp else 0)) * AUTOTP_GRAIN for r in range(tp)]
        sizes[-1] += rem
        return sizes
    return [total // tp + (1 if r < total % tp else 0) for r in range(tp)]


def tp_supported(spec: ModelSpec) -> bool:
    """Whether the actor's generation copy can be tensor-parallel: a LLaMA-style layout (llama/mistral/qwen2 config,
    a bare count, or an exact listing with q_proj/gate_proj decoder layers). GPT-2 is refused by AutoTP."""
    if spec.arch == "gpt2":
        return False
    if spec.arch == "llama":
        return True
    names = [n for n, _ in _layout(spec)]
    return any(n.endswith("self_attn.q_proj.weight") for n in names) and any(n.endswith("mlp.gate_proj.weight")
                                                                              for n in names)


def check_tp(spec: ModelSpec, tp_size: int, hardware: "Hardware") -> None:
    """Raise ValueError unless ``tp_size`` is usable for this actor on this hardware."""
    if tp_size == 1:
        return
    if hardware.gpus_per_node % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide gpus_per_node ({hardware.gpus_per_node}): tensor-parallel "
                         f"groups are formed within a node")
    if not tp_supported(spec):
        raise ValueError(f"tp_size > 1 does not support the actor {spec.name or ''} ({spec.arch} layout): "
                         f"tensor-parallel generation supports {', '.join(TP_FAMILIES)} (LLaMA-style); use tp_size=1")


def _tp_split(name: str) -> Tuple[Optional[int], bool]:
    """(dimension AutoTP splits this parameter along or None for whole, split on kv-head boundaries)."""
    parts = name.split(".")
    if len(parts) < 2:
        return None, False
    leaf, kind = parts[-2], parts[-1]
    if leaf in _TP_COLUMN:
        return 0, leaf in _TP_BY_HEADS
    if leaf in _TP_ROW and kind == "weight":
        return 1, leaf in _TP_BY_HEADS
    return None, False


@lru_cache(maxsize=1024)
def tp_copy_numel(spec: ModelSpec, tp_size: int) -> Tuple[int, ...]:
    """Elements of the actor's generation copy each rank of a TP group holds (index = rank in the group).

    Mirrors rlhf_ds.rollout.tensor_parallel (DeepSpeed AutoTP, inference mode): q/k/v/gate/up split by output
    features, o/down by input features, the LM head by hidden features (a tied head is untied: its own split copy
    next to the whole embedding), embeddings, norms and row-parallel biases whole on every rank. With a bare
    parameter count the split is computed on the guessed LLaMA layout and scaled to the count."""
    spec = dataclasses.replace(spec, value_head=False) if spec.value_head else spec
    tensors = list(_layout(spec))
    if tp_size == 1:
        return (spec.total_params,)
    if spec.tie_embeddings and not any(n.startswith("lm_head.") for n, _ in tensors):
        d = _dims(spec)  # AutoTP unties a tied head: the copy holds the whole embedding and a split head
        tensors.append(("lm_head.weight", (d.vocab, d.hidden)))
    kv = _dims(spec).n_kv_heads
    per_rank = [0] * tp_size
    for name, shape in tensors:
        dim, by_heads = _tp_split(name)
        n = _numel(shape)
        if dim is None or dim >= len(shape):
            per_rank = [x + n for x in per_rank]
            continue
        sizes = autotp_shard_sizes(int(shape[dim]), tp_size, kv, by_heads)
        rest = n // int(shape[dim])
        per_rank = [x + s * rest for x, s in zip(per_rank, sizes)]
    laid_out = sum(_numel(s) for _, s in _layout(spec))
    if spec.n_params is not None and laid_out != spec.total_params:  # a count wins: scale the guessed layout's split
        per_rank = [int(round(x * spec.total_params / laid_out)) for x in per_rank]
    return tuple(per_rank)


def generation_copy_bytes(spec: ModelSpec, tp_size: int = 1, precision: str = "bf16") -> List[int]:
    """Bytes of the actor's generation copy per rank of a TP group (parameters, in the actor's dtype)."""
    return [PRECISION_BYTES[precision] * n for n in tp_copy_numel(spec, tp_size)]


def gather_group_numel(spec: ModelSpec, world: int, group_size: int) -> int:
    """Largest group of ``group_size`` consecutive parameter tensors the sync gathers at once, each padded to a
    multiple of the world size as ZeRO-3 stores it (``engine.params.iter_full_params``' flat all-gather)."""
    tensors = [_numel(s) for n, s in _layout(dataclasses.replace(spec, value_head=False) if spec.value_head else spec)]
    if not tensors:
        return 0
    g = max(1, int(group_size))
    biggest = max(sum(world * _ceil_div(n, world) for n in tensors[i : i + g]) for i in range(0, len(tensors), g))
    laid_out = sum(tensors)
    if spec.n_params is not None and laid_out != spec.total_params:
        biggest = int(round(biggest * spec.total_params / laid_out))
    return biggest


def generation_kv_cache_bytes(batch: int, seq: int, dims: _Dims, dtype_bytes: int, tp_size: int = 1) -> int:
    """KV cache per rank while generating. With tp_size > 1 a rank keeps only its kv heads (⌈kv/tp⌉ on the fullest
    rank, AutoTP's head split) but of every sequence its TP group decodes together: the group's tp × batch prompts."""
    heads = _ceil_div(dims.n_kv_heads, tp_size)
    return int(2 * dims.n_layers * heads * dims.head_dim * (tp_size * batch) * seq * dtype_bytes)


@lru_cache(maxsize=4096)
def _zero12_layout(numels: Tuple[int, ...], world: int) -> Tuple[int, int, int]:
    """(padded flat numel, partition numel, max over ranks of grad numel held).

    ZeRO-1/2 flatten the trained tensors (in order) into one buffer padded to a multiple of
    2*world and give rank r the slice [r*part, (r+1)*part).  After backward a rank holds the
    gradients of every tensor overlapping its slice in full (measured), so a tensor that
    straddles a boundary is held by both ranks.
    """
    total = sum(numels)
    padded = _round_up(total, ZERO12_ALIGNMENT * world) if total else 0
    part = padded // world if world else 0
    if world == 1 or not numels:
        return padded, part, part
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    held_max = 0
    for r in range(world):
        lo, hi = r * part, min((r + 1) * part, total)
        if lo >= total:
            continue
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        held = starts[last + 1] - starts[first]
        held_max = max(held_max, held, part)
    return padded, part, held_max


@dataclass
class ModelPlan:
    role: str
    name: str
    settings: TrainSettings
    n_params: int  # total, including LoRA adapters
    n_trainable: int
    gpu: Dict[str, int]  # per GPU, by GPU_CATEGORIES
    cpu_per_node: Dict[str, int]  # per node, by CPU_CATEGORIES
    gpu_details: Dict[str, int]
    cpu_details: Dict[str, int]  # per node
    resident_gpu: int  # held for the whole job
    phases: Dict[str, int]  # extra GPU bytes held only during a phase
    cpu_steady_per_node: int
    cpu_load_peak_per_node: int  # while a rank materialises this model
    notes: List[str] = field(default_factory=list)

    @property
    def model_states_gpu(self) -> int:
        """weights + gradients + optimizer states (master copy + moments) per GPU."""
        return self.gpu["weights"] + self.gpu["gradients"] + self.gpu["optimizer_states"]

    @property
    def gpu_alone(self) -> int:
        """This model's GPU peak if it were alone: resident + its largest phase."""
        return self.resident_gpu + max(self.phases.values(), default=0)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "role": self.role, "name": self.name, "settings": dataclasses.asdict(self.settings),
            "n_params": self.n_params, "n_trainable": self.n_trainable,
            "gpu_bytes": dict(self.gpu), "gpu_details_bytes": dict(self.gpu_details),
            "cpu_bytes_per_node": dict(self.cpu_per_node), "cpu_details_bytes_per_node": dict(self.cpu_details),
            "model_states_gpu_bytes": self.model_states_gpu, "resident_gpu_bytes": self.resident_gpu,
            "phase_gpu_bytes": dict(self.phases), "cpu_steady_bytes_per_node": self.cpu_steady_per_node,
            "cpu_load_peak_bytes_per_node": self.cpu_load_peak_per_node, "notes": list(self.notes),
        }


def _plan_model(spec: ModelSpec, st: TrainSettings, hw: Hardware, wl: Workload, kn: DeepSpeedKnobs) -> ModelPlan:
    return copy.deepcopy(_plan_model_cached(spec, st, hw, wl, kn))  # callers may edit their plan


@lru_cache(maxsize=8192)
def _plan_model_cached(spec: ModelSpec, st: TrainSettings, hw: Hardware, wl: Workload,
                       kn: DeepSpeedKnobs) -> ModelPlan:
    notes: List[str] = []
    N = hw.world_size
    G = hw.gpus_per_node
    stage = st.zero_stage
    w = PRECISION_BYTES[st.precision]
    g = w  # DeepSpeed accumulates/reduces grads in the model dtype unless data_types.grad_accum_dtype is set
    mixed = st.precision != "fp32"
    trained = bool(st.trained)
    if spec.value_head is None and st.role in ("critic", "reward") and spec.layout_known:
        spec = spec.with_value_head()
    dims = spec.dims()
    if dims.inferred:
        notes.append(f"architecture guessed from the parameter count (L={dims.n_layers}, h={dims.hidden}, "
                     f"V={dims.vocab}); activations/KV/LoRA sizes are approximate")
    exact_layout = spec.layout_known and spec.n_params is None
    base = spec.total_params

    # -- what is trained
    lora_tensors: Tuple[Tensor, ...] = ()
    if trained and st.uses_lora:
        if st.lora_trainable_params is not None:
            n_lora = int(st.lora_trainable_params)
        elif st.lora_trainable_fraction is not None:
            n_lora = int(round(st.lora_trainable_fraction * base))
        else:
            targets = st.lora_target_modules or default_lora_targets(spec)
            lora_tensors = _lora_tensors(spec, int(st.lora_rank), tuple(targets))
            n_lora = sum(_numel(s) for _, s in lora_tensors)
            if not spec.layout_known:
                notes.append("LoRA size computed on the guessed architecture")
        total = base + n_lora
        n_train, n_frozen = n_lora, base
        train_numels = tuple(_numel(s) for _, s in lora_tensors) if lora_tensors else None
    elif trained:
        total, n_train, n_frozen = base, base, 0
        train_numels = tuple(_numel(s) for _, s in _layout(spec)) if exact_layout else None
    else:
        total, n_train, n_frozen = base, 0, base
        train_numels = None
    frozen_numels = tuple(_numel(s) for _, s in _layout(spec)) if exact_layout else None

    def z3_part(numels: Optional[Tuple[int, ...]], count: int) -> int:
        """ZeRO-3 partition: every tensor is padded to a multiple of the world size."""
        if numels is not None:
            return sum(_ceil_div(n, N) for n in numels)
        return _ceil_div(count, N)

    gpu_d: Dict[str, int] = {}
    cpu_d: Dict[str, int] = {}  # per rank, scaled to per node below

    # -- weights
    if stage == 3:
        w_train = w * z3_part(train_numels, n_train) if n_train else 0
        w_frozen = w * z3_part(frozen_numels, n_frozen) if n_frozen else 0
    else:
        if n_train and stage in (1, 2):
            padded = _zero12_layout(train_numels, N)[0] if train_numels else _round_up(n_train, ZERO12_ALIGNMENT * N)
        else:
            padded = n_train
        w_train, w_frozen = w * padded, w * n_frozen
    weights = w_train + w_frozen
    (cpu_d if st.offload_params else gpu_d)["weights"] = weights

    # -- partition of the trained parameters each rank owns (optimizer side)
    if n_train == 0:
        part = 0
    elif stage == 3:
        part = z3_part(train_numels, n_train)
    elif stage in (1, 2):
        part = (_zero12_layout(train_numels, N)[1] if train_numels
                else _round_up(n_train, ZERO12_ALIGNMENT * N) // N)
    else:
        part = n_train

    grads_resident = 0
    grads_transient = 0
    resident_offload_temp = 0
    if trained and n_train:
        # gradients
        if st.offload_optimizer:  # reduced grads stream into an fp32 CPU buffer
            cpu_d["gradients_fp32"] = 4 * part
            if stage == 3:
                cpu_d["gradients_16bit"] = g * part  # grad_partitions_flat_buffer lives on the CPU
            else:
                cpu_d["bit16_staging"] = w * part  # param_buffer_of_bit16_for_cpu_offload_groups
                # temp_grad_buffer_for_{cpu,gpu}_offload: one largest-trained-tensor each
                largest_t = max(train_numels) if train_numels else max(_numel(s) for _, s in _layout(spec))
                cpu_d["offload_temp_grad"] = w * min(largest_t, n_train)
                resident_offload_temp = w * min(largest_t, n_train)
        elif stage == 3:
            grads_resident = g * part  # grad_partitions_flat_buffer: allocated once, kept
        elif stage == 2:
            held = _zero12_layout(train_numels, N)[2] if train_numels else part
            grads_transient = g * held
            if held > part:
                gpu_d["grad_partition_boundary"] = g * (held - part)
        else:  # ZeRO-0/1: every rank holds the full gradients until the step
            grads_transient = g * n_train
        # optimizer states
        master = MASTER_BYTES * part if (mixed or stage >= 1) else 0
        state_b = OPTIMIZER_STATE_BYTES[st.optimizer]
        if st.optimizer == "adamw_8bit" and stage == 0 and train_numels:
            small = sum(n for n in train_numels if n < BNB_MIN_8BIT_SIZE)
            moments = state_b * (part - small) + 8 * small
        else:
            moments = state_b * part
        dst = cpu_d if st.offload_optimizer else gpu_d
        dst["master_weights"] = master
        dst["moments"] = moments
    gpu_d["gradients"] = grads_resident + grads_transient

    # -- transient / buffer terms
    overlap = kn.overlap_comm if kn.overlap_comm is not None else stage == 3
    train_buffers: Dict[str, int] = {}
    resident_buffers: Dict[str, int] = {}
    if trained and n_train:
        if not st.offload_optimizer:
            if stage == 3:
                train_buffers["fp32_grad_scratch"] = 4 * min(part, kn.sub_group_size)
            elif stage in (1, 2) or mixed:
                train_buffers["fp32_grad_scratch"] = 4 * part
        if stage == 0 and N > 1:
            train_buffers["reduce_bucket"] = g * min(kn.stage0_allreduce_bucket, n_train)
        elif stage in (1, 2) and kn.contiguous_gradients:
            train_buffers["reduce_bucket"] = g * kn.reduce_bucket_size * (2 if overlap else 1)
        elif stage == 3 and kn.contiguous_gradients:
            resident_buffers["reduce_bucket"] = g * kn.reduce_bucket_size
    if resident_offload_temp:
        resident_buffers["offload_temp_grad"] = resident_offload_temp
    z3_working: Dict[str, int] = {}
    if stage == 3:
        largest = spec.largest_layer()
        z3_working["zero3_live_layer"] = largest * (w + (g if trained else 0))
        z3_working["zero3_prefetch_bucket"] = w * min(kn.prefetch_bucket_size, total, kn.max_live_parameters)
        if trained:  # what a forward keeps gathered for its backward to reuse (all within the reuse distance)
            z3_working["zero3_reuse_held"] = w * min(total, kn.max_reuse_distance)
        if spec.layout_known:
            small = sum(_numel(s) for _, s in _layout(spec) + lora_tensors
                        if _numel(s) <= kn.param_persistence_threshold)
            small = min(small, kn.max_live_parameters)
            if small:
                resident_buffers["zero3_persistent_params"] = w * small
    gpu_d.update({k: v for k, v in resident_buffers.items()})

    # -- activations, KV cache, gathered copy
    logit_width = 1 if (spec.value_head or st.role in ("critic", "reward")) else dims.vocab
    s_len = wl.seq_len
    act_train = training_activation_bytes(wl.micro_batch, s_len, dims, w, wl.flash_attention,
                                          st.gradient_checkpointing, logit_width, wl.logit_chunk_tokens) if trained else 0
    act_infer = inference_activation_bytes(wl.gen_batch, s_len, dims, w, wl.flash_attention, logit_width,
                                           wl.logit_chunk_tokens)
    kv = gathered = gather_group = 0
    tp = st.tp_size
    if st.role == "actor" and wl.generate:
        check_tp(spec, tp, hw)
        kv = generation_kv_cache_bytes(wl.gen_batch, s_len, dims, w, tp)
        if tp > 1:  # the TP engine builds its own slice-only copy (any stage)
            copy_ranks = tp_copy_numel(spec, tp)
            gathered = w * max(copy_ranks)
            notes.append(f"generation: hybrid.tp_size {tp}, each rank holds {_gb(gathered)} GB of the copy "
                         f"(whole copy {_gb(w * base)} GB); ranks of a TP group decode their {tp} x {wl.gen_batch} "
                         f"prompts together")
        elif stage == 3:
            gathered = w * base  # the whole architecture, LoRA fused (adapters are not part of the copy)
        if stage == 3:  # the sync streams the shards one gather group of full tensors at a time
            gather_group = w * gather_group_numel(spec, N, kn.gather_group_size)
    gpu_d["activations_train"] = act_train
    gpu_d["activations_inference"] = act_infer
    gpu_d["kv_cache"] = kv
    gpu_d["gathered_params"] = gathered
    gpu_d["generation_gather_group"] = gather_group
    for k, v in list(train_buffers.items()) + list(z3_working.items()):
        gpu_d[k] = v

    # -- phases
    phases: Dict[str, int] = {}
    z3_ws = sum(z3_working.values())
    # frozen-style forward: ZeRO-3 gathers one layer (no grads) plus the prefetch bucket
    z3_forward = (z3_working["zero3_prefetch_bucket"] + spec.largest_layer() * w) if stage == 3 else 0
    phases["experience"] = act_infer + z3_forward
    if trained:
        phases["train"] = grads_transient + act_train + sum(train_buffers.values()) + z3_ws
    if kv or gathered:
        phases["generation"] = kv + gathered + gather_group
    resident = (gpu_d.get("weights", 0) + gpu_d.get("master_weights", 0) + gpu_d.get("moments", 0)
                + grads_resident + sum(resident_buffers.values()))

    gpu = {
        "weights": gpu_d.get("weights", 0),
        "gradients": gpu_d["gradients"],
        "optimizer_states": gpu_d.get("master_weights", 0) + gpu_d.get("moments", 0),
        "activations": act_train if trained else act_infer,
        "kv_cache": kv,
        "gathered_params": gathered,
        "buffers": sum(train_buffers.values()) + sum(resident_buffers.values()) + z3_ws + gather_group,
    }
    cpu_node = {k: v * G for k, v in cpu_d.items()}
    cpu = {
        "weights": cpu_node.get("weights", 0),
        "gradients": cpu_node.get("gradients_fp32", 0) + cpu_node.get("gradients_16bit", 0),
        "optimizer_states": cpu_node.get("master_weights", 0) + cpu_node.get("moments", 0),
        "buffers": cpu_node.get("bit16_staging", 0) + cpu_node.get("offload_temp_grad", 0),
    }
    load_elems = spec.largest_layer() if (stage == 3 and kn.zero_init) else total
    load_peak = G * load_elems * kn.load_bytes_per_param
    cpu_node["load_peak"] = load_peak
    if st.optimizer == "adamw_8bit" and trained:
        notes.append("8-bit states: 2 B/param (+1.6% bitsandbytes block scales, not counted)")
    if not trained and (st.lora_rank or st.lora_trainable_params or st.lora_trainable_fraction):
        notes.append("LoRA ignored: model is not trained")
    return ModelPlan(role=st.role, name=spec.name or f"{base / 1e9:.3g}B", settings=st, n_params=total,
                     n_trainable=n_train if trained else 0, gpu=gpu, cpu_per_node=cpu, gpu_details=gpu_d,
                     cpu_details=cpu_node, resident_gpu=resident, phases=phases,
                     cpu_steady_per_node=sum(cpu.values()), cpu_load_peak_per_node=load_peak, notes=notes)


# --------------------------------------------------------------------------- job plan


@dataclass
class Plan:
    models: Dict[str, ModelPlan]
    hardware: Hardware
    workload: Workload
    knobs: DeepSpeedKnobs
    gpu_resident: int
    gpu_phase_peaks: Dict[str, int]  # phase -> resident + that phase's extra bytes
    gpu_peak: int  # includes hardware.gpu_reserved_gb
    gpu_peak_phase: str
    cpu_peak_per_node: int
    cpu_steady_per_node: int
    notes: List[str] = field(default_factory=list)

    @property
    def gpu_capacity(self) -> int:
        return int(self.hardware.gpu_memory_gb * GB)

    @property
    def cpu_capacity(self) -> int:
        return int(self.hardware.cpu_memory_gb * GB)

    @property
    def gpu_headroom(self) -> int:
        return self.gpu_capacity - self.gpu_peak

    @property
    def cpu_headroom(self) -> int:
        return self.cpu_capacity - self.cpu_peak_per_node

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_headroom >= 0

    @property
    def fits_cpu(self) -> bool:
        return self.cpu_headroom >= 0

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def to_dict(self) -> Dict[str, Any]:
        return {
            "units": "bytes (GB = 1e9, GiB = 2**30)",
            "hardware": dataclasses.asdict(self.hardware),
            "workload": dataclasses.asdict(self.workload),
            "deepspeed": dataclasses.asdict(self.knobs),
            "world_size": self.hardware.world_size,
            "models": {k: m.to_dict() for k, m in self.models.items()},
            "gpu": {"resident_bytes": self.gpu_resident, "phase_peak_bytes": dict(self.gpu_phase_peaks),
                    "reserved_bytes": int(self.hardware.gpu_reserved_gb * GB),
                    "peak_bytes": self.gpu_peak, "peak_phase": self.gpu_peak_phase,
                    "capacity_bytes": self.gpu_capacity, "headroom_bytes": self.gpu_headroom,
                    "fits": self.fits_gpu},
            "cpu_per_node": {"steady_bytes": self.cpu_steady_per_node, "peak_bytes": self.cpu_peak_per_node,
                             "capacity_bytes": self.cpu_capacity, "headroom_bytes": self.cpu_headroom,
                             "fits": self.fits_cpu},
            "fits": self.fits,
            "notes": list(self.notes),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        return format_plan(self)


ModelsArg = Union[Mapping[str, Any], Sequence[Tuple[ModelSpec, TrainSettings]]]


def _normalize_models(models: ModelsArg) -> List[Tuple[ModelSpec, TrainSettings]]:
    out: List[Tuple[ModelSpec, TrainSettings]] = []
    items: Iterable
    if isinstance(models, Mapping):
        items = models.items()
    else:
        items = [(None, m) for m in models]
    for role, entry in items:
        if isinstance(entry, ModelSpec):
            spec, st = entry, TrainSettings(role=role or "actor")
        else:
            spec, st = entry
            if st is None:
                st = TrainSettings(role=role or "actor")
        if role is not None and st.role != role:
            st = dataclasses.replace(st, role=role)
        out.append((spec, st))
    roles = [st.role for _, st in out]
    if len(set(roles)) != len(roles):
        raise ValueError(f"duplicate roles: {roles}")
    if not out:
        raise ValueError("no models to plan")
    return out


def plan_job(models: ModelsArg, hardware: Hardware = Hardware(), workload: Workload = Workload(),
             knobs: DeepSpeedKnobs = DeepSpeedKnobs()) -> Plan:
    """Plan memory for ``models`` (role -> (ModelSpec, TrainSettings), or (spec, settings) pairs).

    GPU peak = sum of every model's resident bytes + the largest phase (generation, each
    model's experience forward, each trained model's training step; the last two with what
    trained ZeRO-3 models keep gathered from a forward to its backward) + reserved.  CPU per
    node = offloaded states, with each model's load-time peak added while it is built
    (models are built in the order given).
    """
    pairs = _normalize_models(models)
    plans = {st.role: _plan_model(spec, st, hardware, workload, knobs) for spec, st in pairs}
    resident = sum(p.resident_gpu for p in plans.values())
    phase_extra: Dict[str, int] = {}
    for role, p in plans.items():
        for ph, v in p.phases.items():
            if ph == "experience":
                phase_extra["experience:" + role] = v
            elif ph == "generation":
                phase_extra["generation"] = phase_extra.get("generation", 0) + v
            else:
                phase_extra[f"{ph}:{role}"] = v
    # a trained ZeRO-3 model keeps what its forward gathered until its backward: in step 3 from its scoring forward to
    # its training pass, while the other models score and train
    held = {role: p.gpu_details.get("zero3_reuse_held", 0) for role, p in plans.items()}
    for ph in phase_extra:
        if ph != "generation":
            phase_extra[ph] += sum(held.values()) - (held[ph.split(":")[1]] if ph.startswith("train:") else 0)
    reserved = int(hardware.gpu_reserved_gb * GB)
    phase_peaks = {ph: resident + v for ph, v in phase_extra.items()}
    peak_phase = max(phase_extra, key=phase_extra.get) if phase_extra else "resident"
    gpu_peak = resident + max(phase_extra.values(), default=0) + reserved
    steady = 0
    cpu_peak = 0
    for p in plans.values():
        cpu_peak = max(cpu_peak, steady + max(p.cpu_load_peak_per_node, p.cpu_steady_per_node))
        steady += p.cpu_steady_per_node
    cpu_peak = max(cpu_peak, steady)
    by_note: Dict[str, List[str]] = {}
    for role, p in plans.items():
        for n in p.notes:
            by_note.setdefault(n, []).append(role)
    notes = [f"{', '.join(roles)}: {n}" for n, roles in by_note.items()]
    return Plan(models=plans, hardware=hardware, workload=workload, knobs=knobs, gpu_resident=resident,
                gpu_phase_peaks=phase_peaks, gpu_peak=gpu_peak, gpu_peak_phase=peak_phase,
                cpu_peak_per_node=cpu_peak, cpu_steady_per_node=steady, notes=notes)


def bytes_per_param(precision: str = "bf16", optimizer: str = "adamw") -> Dict[str, int]:
    """The textbook per-parameter rule for full fine-tuning without ZeRO.

    ``{"weights", "gradients", "master_weights", "optimizer_states", "total"}``; e.g.
    bf16 + AdamW: 2 + 2 + 4 + 8 = 16, fp32: 4 + 4 + 0 + 8 = 16.
    """
    w = PRECISION_BYTES[precision]
    master = MASTER_BYTES if precision != "fp32" else 0
    s = OPTIMIZER_STATE_BYTES[optimizer]
    return {"weights": w, "gradients": w, "master_weights": master, "optimizer_states": s,
            "total": 2 * w + master + s}


# --------------------------------------------------------------------------- formatting


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _settings_label(st: TrainSettings) -> str:
    bits = [f"z{st.zero_stage}", st.precision]
    if st.trained:
        if st.uses_lora:
            bits.append(f"lora{st.lora_rank}" if st.lora_rank else "lora")
        if st.optimizer != "adamw":
            bits.append("8bit")
        if st.gradient_checkpointing:
            bits.append("ckpt")
        if st.offload_optimizer:
            bits.append("off-opt")
    else:
        bits.append("frozen")
    if st.offload_params:
        bits.append("off-par")
    if st.tp_size > 1:
        bits.append(f"tp{st.tp_size}")
    return ",".join(bits)


def describe_settings(st: TrainSettings) -> str:
    """One model's settings in words: ZeRO stage, what is trained (LoRA), optimizer, offload, tp_size."""
    bits = [f"ZeRO-{st.zero_stage}", st.precision]
    if st.trained:
        bits.append((f"LoRA rank {st.lora_rank}" if st.lora_rank else "LoRA") if st.uses_lora else "full fine-tuning")
        bits.append("8-bit AdamW" if st.optimizer == "adamw_8bit" else "AdamW")
        if st.gradient_checkpointing:
            bits.append("gradient checkpointing")
    else:
        bits.append("frozen")
    off = [k for k, on in (("optimizer", st.offload_optimizer and st.trained), ("params", st.offload_params)) if on]
    bits.append("offload " + "+".join(off) if off else "no offload")
    if st.role == "actor":
        bits.append(f"hybrid.tp_size {st.tp_size}")
    return ", ".join(bits)


def format_plan(plan: Plan) -> str:
    hw, wl = plan.hardware, plan.workload
    lines = [
        f"RLHF memory plan -- {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) = {hw.world_size} ranks, "
        f"{hw.gpu_memory_gb:g} GB/GPU, {hw.cpu_memory_gb:g} GB CPU/node   [GB = 1e9 bytes]",
        f"workload: micro_batch {wl.micro_batch}, prompt {wl.prompt_len} + response {wl.response_len} tokens, "
        f"generation batch {wl.gen_batch}" + ("" if wl.flash_attention else ", eager attention"),
        "",
    ]
    head = ["model", "params", "settings", "weights", "grads", "optim", "states", "activ", "kv", "gather",
            "buffers", "alone", "CPU/node"]
    rows = []
    for role, m in plan.models.items():
        g = m.gpu
        rows.append([role, f"{m.n_params / 1e9:.3g}B" + (f" ({m.n_trainable / 1e6:.3g}M tr)"
                                                          if m.n_trainable and m.n_trainable != m.n_params else ""),
                     _settings_label(m.settings), _gb(g["weights"]), _gb(g["gradients"]),
                     _gb(g["optimizer_states"]), _gb(m.model_states_gpu), _gb(g["activations"]), _gb(g["kv_cache"]),
                     _gb(g["gathered_params"]), _gb(g["buffers"]), _gb(m.gpu_alone),
                     _gb(max(m.cpu_steady_per_node, m.cpu_load_peak_per_node))])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(widths[i]) if i < 3 else str(c).rjust(widths[i])  # noqa: E731
                              for i, c in enumerate(r))
    lines.append("per-GPU GB by category (states = weights + grads + optim; alone = resident + the model's "
                 "largest phase; CPU/node = max(steady, load peak)):")
    lines.append(fmt(head))
    lines += [fmt(r) for r in rows]
    lines.append("")
    reserved = hw.gpu_reserved_gb * GB
    lines.append(f"GPU peak: {_gb(plan.gpu_peak)} GB ({plan.gpu_peak / GIB:.2f} GiB) = resident "
                 f"{_gb(plan.gpu_resident)} + phase '{plan.gpu_peak_phase}' "
                 f"{_gb(plan.gpu_peak - plan.gpu_resident - reserved)} + reserved {_gb(reserved)}; "
                 f"capacity {hw.gpu_memory_gb:g} GB -> "
                 + ("fits, headroom " if plan.fits_gpu else "DOES NOT FIT, over by ")
                 + f"{_gb(abs(plan.gpu_headroom))} GB")
    lines.append("  phases: " + ", ".join(f"{k} {_gb(v)}" for k, v in plan.gpu_phase_peaks.items()))
    lines.append(f"CPU per node: peak {_gb(plan.cpu_peak_per_node)} GB ({plan.cpu_peak_per_node / GIB:.2f} GiB), "
                 f"steady {_gb(plan.cpu_steady_per_node)} GB; capacity {hw.cpu_memory_gb:g} GB -> "
                 + ("fits, headroom " if plan.fits_cpu else "DOES NOT FIT, over by ")
                 + f"{_gb(abs(plan.cpu_headroom))} GB")
    if plan.notes:
        lines.append("notes:")
        lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- recommend

#: Memory-saving measures, cheapest (fastest / least intrusive) first.  Each measure's cost
#: is 2**index, so a more expensive measure is only used when no combination of cheaper
#: ones fits (lexicographic order).
MEASURES = ("zero1", "zero2", "zero3", "gradient_checkpointing", "generation_tp2", "generation_tp4", "generation_tp8",
            "8bit_optimizer", "lora_actor", "offload_frozen_models", "offload_optimizer", "offload_params")
MEASURE_COST = {m: 2**i for i, m in enumerate(MEASURES)}


@dataclass
class Recommendation:
    fits: bool
    settings: Dict[str, TrainSettings]
    plan: Plan  # the chosen plan, or the closest miss when nothing fits
    measures: List[str]
    cost: int
    message: str
    gpu_over_bytes: int = 0
    cpu_over_bytes: int = 0
    nodes_needed: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"fits": self.fits, "measures": list(self.measures), "cost": self.cost, "message": self.message,
                "settings": {k: dataclasses.asdict(v) for k, v in self.settings.items()},
                "gpu_over_bytes": self.gpu_over_bytes, "cpu_over_bytes": self.cpu_over_bytes,
                "nodes_needed": self.nodes_needed, "plan": self.plan.to_dict()}

    def table(self) -> str:
        return self.message + "\n\n" + format_plan(self.plan)


def _tp_options(pairs, hardware: Hardware, workload: Workload) -> Tuple[int, ...]:
    """tp_size values worth trying: divisors of gpus_per_node in TP_SIZES, for a generating LLaMA-style actor."""
    actor = next((spec for spec, st in pairs if st.role == "actor"), None)
    if actor is None or not workload.generate or not tp_supported(actor):
        return (1,)
    return tuple(t for t in TP_SIZES if hardware.gpus_per_node % t == 0)


def _candidates(pairs, lora_rank: int, tp_sizes: Sequence[int] = (1,)):
    trained_roles = [st.role for _, st in pairs if st.trained]
    has_frozen = any(not st.trained for _, st in pairs)
    user_lora = any(st.uses_lora for _, st in pairs if st.role == "actor")
    user_tp = max((st.tp_size for _, st in pairs if st.role == "actor"), default=1)
    has_actor = "actor" in trained_roles
    # a TP copy only pays off under ZeRO-3 (ZeRO 0-2 generate from the resident weights); a given tp_size is kept
    stage_tp = [(stage, tp) for stage in (0, 1, 2, 3)
                for tp in ((user_tp,) if user_tp > 1 else tuple(tp_sizes) if stage == 3 else (1,))]
    for stage, tp in stage_tp:
        for off_opt in ((False,) if stage == 0 else (False, True)):
            for off_par in ((False, True) if stage == 3 else (False,)):
                for gc in (False, True):
                    for bit8 in (False, True):
                        for lora in ((False, True) if has_actor and not user_lora else (user_lora,)):
                            for frozen in ((0, 3, "offload") if has_frozen else (None,)):
                                measures = set()
                                if tp > 1 and user_tp == 1:
                                    measures.add(f"generation_tp{tp}")
                                if trained_roles:
                                    if stage:
                                        measures.add(f"zero{stage}")
                                    if gc:
                                        measures.add("gradient_checkpointing")
                                    if bit8:
                                        measures.add("8bit_optimizer")
                                    if lora and not user_lora:
                                        measures.add("lora_actor")
                                    if off_opt:
                                        measures.add("offload_optimizer")
                                    if off_par:
                                        measures.add("offload_params")
                                if frozen == 3:
                                    measures.add("zero3")
                                elif frozen == "offload":
                                    measures.update(("zero3", "offload_frozen_models"))
                                new = []
                                for spec, st in pairs:
                                    if st.role == "actor":
                                        st = dataclasses.replace(st, tp_size=tp)
                                    if st.trained:
                                        st2 = dataclasses.replace(
                                            st, zero_stage=stage, offload_optimizer=off_opt, offload_params=off_par,
                                            gradient_checkpointing=gc, optimizer="adamw_8bit" if bit8 else "adamw")
                                        if st.role == "actor" and lora and not user_lora:
                                            st2 = dataclasses.replace(st2, lora_rank=lora_rank)
                                    else:
                                        st2 = dataclasses.replace(st, zero_stage=3 if frozen in (3, "offload") else 0,
                                                                  offload_params=frozen == "offload",
                                                                  offload_optimizer=False)
                                    new.append((spec, st2))
                                yield sorted(measures, key=MEASURES.index), new


def _search(pairs, hardware, workload, knobs, headroom_gb, lora_rank):
    best = None  # cheapest fitting: (cost, -headroom)
    closest = None  # smallest relative overflow
    need = int(headroom_gb * GB)
    seen = set()
    for measures, cand in _candidates(pairs, lora_rank, _tp_options(pairs, hardware, workload)):
        key = tuple(st for _, st in cand)
        if key in seen:
            continue
        seen.add(key)
        plan = plan_job(cand, hardware, workload, knobs)
        cost = sum(MEASURE_COST[m] for m in measures)
        gpu_over = max(0, need - plan.gpu_headroom)
        cpu_over = max(0, -plan.cpu_headroom)
        if gpu_over == 0 and cpu_over == 0:
            rank = (cost, -plan.gpu_headroom)
            if best is None or rank < best[0]:
                best = (rank, measures, cand, plan)
        else:
            miss = max(gpu_over / max(plan.gpu_capacity, 1), cpu_over / max(plan.cpu_capacity, 1))
            if closest is None or (miss, cost) < closest[0]:
                closest = ((miss, cost), measures, cand, plan, gpu_over, cpu_over)
    return best, closest


def recommend(models: ModelsArg, hardware: Hardware = Hardware(), workload: Workload = Workload(),
              knobs: DeepSpeedKnobs = DeepSpeedKnobs(), *, headroom_gb: float = 0.0,
              lora_rank: int = 16, max_nodes: int = 64) -> Recommendation:
    """Cheapest settings (see ``MEASURES`` for the order) under which the job fits.

    Trained models (actor, critic) share one ZeRO stage / checkpointing / optimizer /
    offload choice; frozen models (reference, reward) are replicated (ZeRO-0), sharded
    (ZeRO-3) or sharded and offloaded to CPU.  Precision is kept as given.  ``headroom_gb``
    GB must stay free on each GPU.  When nothing fits, the closest candidate is returned
    with how many GB it is over on GPU/CPU, and the node count at which the job would fit.
    """
    pairs = _normalize_models(models)
    best, closest = _search(pairs, hardware, workload, knobs, headroom_gb, lora_rank)
    if best is not None:
        (cost, _), measures, cand, plan = best
        msg = (f"Fits with: {', '.join(measures) if measures else 'no memory-saving measures'} "
               f"(GPU peak {_gb(plan.gpu_peak)} of {hardware.gpu_memory_gb:g} GB, "
               f"headroom {_gb(plan.gpu_headroom)} GB; "
               f"CPU {_gb(plan.cpu_peak_per_node)} of {hardware.cpu_memory_gb:g} GB/node, "
               f"headroom {_gb(plan.cpu_headroom)} GB)")
        msg += "".join(f"\n  {st.role}: {describe_settings(st)}" for _, st in cand)
        return Recommendation(True, {st.role: st for _, st in cand}, plan, list(measures), cost, msg)
    (_, cost), measures, cand, plan, gpu_over, cpu_over = closest
    nodes_needed = None
    n = hardware.nodes * 2
    while n <= max_nodes:
        hw2 = dataclasses.replace(hardware, nodes=n)
        if _search(pairs, hw2, workload, knobs, headroom_gb, lora_rank)[0] is not None:
            nodes_needed = n
            break
        n *= 2
    parts = []
    if gpu_over:
        parts.append(f"{_gb(gpu_over)} GB over per GPU ({_gb(plan.gpu_peak)} GB needed"
                     + (f" + {headroom_gb:g} GB headroom" if headroom_gb else "")
                     + f", {hardware.gpu_memory_gb:g} GB available)")
    if cpu_over:
        parts.append(f"{_gb(cpu_over)} GB over per node CPU ({_gb(plan.cpu_peak_per_node)} GB needed, "
                     f"{hardware.cpu_memory_gb:g} GB available)")
    items = sorted(((v, f"{k} ({role})") for role, m in plan.models.items() for k, v in m.gpu.items() if v),
                   reverse=True)[:3]
    biggest = ", ".join(f"{name} {_gb(v)} GB" for v, name in items)
    msg = (f"Nothing fits. Closest: {', '.join(measures) or 'defaults'} -- " + "; ".join(parts) + "."
           + (f" Largest per-GPU items: {biggest}." if biggest else "")
           + (f" It would fit on {nodes_needed} nodes of this kind." if nodes_needed else
              f" It does not fit on up to {max_nodes} nodes of this kind either."))
    return Recommendation(False, {st.role: st for _, st in cand}, plan, list(measures), cost, msg,
                          gpu_over_bytes=gpu_over, cpu_over_bytes=cpu_over, nodes_needed=nodes_needed)


# --------------------------------------------------------------------------- CLI glue


def _model_arg(text: str) -> ModelSpec:
    if os.path.isdir(text):
        return ModelSpec.from_pretrained_dir(text)
    return ModelSpec.from_param_count(text)


def _elements(text: str) -> int:
    """A positive element count: 5000000, 5e6 or 5M."""
    try:
        value = parse_param_count(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive number of elements (5000000, 5e6, 5M), got {text!r}")
    return value


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``rlhf-ds plan`` options to ``parser``."""
    a = parser.add_argument
    a("--actor", required=True, help="actor model folder (config.json) or a parameter count: 7B, 7e9, 350M")
    a("--critic", default=None, help="critic folder or count (default: same as --actor)")
    a("--reward", default=None, help="reward model folder or count (default: same as --critic); 'none' for a reward "
                                     "that is no model here (reward.function, reward.url)")
    a("--advantage-estimator", default="gae", help="ppo.advantage_estimator: only gae trains a critic")
    a("--reference", default=None, help="reference model folder or count (default: same as --actor; with "
                                          "--lora-rank none: the actor's base with its adapters off is the reference)")
    a("--gpus-per-node", type=int, default=8)
    a("--nodes", type=int, default=1)
    a("--gpu-memory-gb", type=float, default=80.0)
    a("--cpu-memory-gb", type=float, default=1000.0, help="CPU memory per node")
    a("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage for every model")
    a("--precision", default="bf16", choices=sorted(PRECISION_BYTES))
    a("--lora-rank", type=int, default=0, help="LoRA rank for the actor (0 = full fine-tuning)")
    a("--offload-optimizer", action="store_true", help="ZeRO-Offload optimizer states of actor/critic to CPU")
    a("--offload-params", action="store_true", help="ZeRO-3 parameter offload for every model")
    a("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATE_BYTES))
    a("--gradient-checkpointing", action="store_true")
    a("--micro-batch", type=int, default=1, help="training micro-batch per GPU")
    a("--prompt-len", type=int, default=256)
    a("--response-len", type=int, default=256)
    a("--generation-batch", type=int, default=None, help="generation batch per GPU (default: --micro-batch)")
    a("--logit-chunk-tokens", type=int, default=Workload.logit_chunk_tokens,
      help="log-probs from hidden states this many tokens at a time (engine.logit_chunk_tokens; 0 = whole logits)")
    a("--tp-size", type=int, default=1,
      help="hybrid.tp_size: ranks of a node that generate together, each holding a tensor-parallel slice of the "
           "actor's generation copy (must divide --gpus-per-node; 1 = a whole copy per rank; --recommend tries "
           "1/2/4/8 when this is 1)")
    a("--param-persistence-threshold", type=int, default=DeepSpeedKnobs.param_persistence_threshold,
      help="ZeRO-3 parameters with fewer elements stay whole on every rank (engine.zero3_param_persistence_threshold)")
    a("--reduce-bucket-size", type=_elements, default=DeepSpeedKnobs.reduce_bucket_size,
      help="elements of gradient reduced at once; one bucket per rank, two under ZeRO-1/2 with overlap_comm "
           "(engine.reduce_bucket_size)")
    a("--prefetch-bucket-size", type=_elements, default=DeepSpeedKnobs.prefetch_bucket_size,
      help="ZeRO-3 parameter elements gathered ahead of use (engine.zero3_prefetch_bucket_size)")
    a("--max-live-parameters", type=_elements, default=DeepSpeedKnobs.max_live_parameters,
      help="ZeRO-3 cap on gathered parameter elements per rank (engine.zero3_max_live_parameters)")
    a("--max-reuse-distance", type=_elements, default=DeepSpeedKnobs.max_reuse_distance,
      help="ZeRO-3 keeps a gathered parameter that is used again within this many elements: a trained model's "
           "forward holds up to this much for its backward (engine.zero3_max_reuse_distance)")
    a("--overlap-comm", action=argparse.BooleanOptionalAction, default=DeepSpeedKnobs.overlap_comm,
      help="overlap gradient reduction with backward (engine.overlap_comm)")
    a("--recommend", action="store_true", help="search for the cheapest settings that fit")
    a("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run_plan_cli(args: argparse.Namespace) -> int:
    """Run ``rlhf-ds plan``.  Returns 0 if the job (or a recommendation) fits, 1 if not, 2 on bad input."""
    try:
        actor = _model_arg(args.actor)
        critic = _model_arg(args.critic) if args.critic else actor
        reward = None if args.reward == "none" else _model_arg(args.reward) if args.reward else critic
        reference = _model_arg(args.reference) if args.reference else actor
        from rlhf_ds.rl.advantages import get_estimator

        needs_critic = get_estimator(args.advantage_estimator).needs_critic
        common = dict(zero_stage=args.zero_stage, precision=args.precision, offload_params=args.offload_params)
        trained = dict(offload_optimizer=args.offload_optimizer, optimizer=args.optimizer,
                       gradient_checkpointing=args.gradient_checkpointing)
        models = {
            "actor": (actor, TrainSettings(role="actor", lora_rank=args.lora_rank, tp_size=args.tp_size, **common,
                                           **trained)),
            "critic": (critic, TrainSettings(role="critic", **common, **trained)),
            "reference": (reference, TrainSettings(role="reference", **common)),
            "reward": (reward, TrainSettings(role="reward", **common)),
        }
        if not needs_critic:
            del models["critic"]
        if reward is None:
            del models["reward"]
        if args.lora_rank and not args.reference:  # the LoRA actor's base with its adapters off (as `ppo` does)
            del models["reference"]
        hw = Hardware(gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_memory_gb=args.gpu_memory_gb,
                      cpu_memory_gb=args.cpu_memory_gb)
        wl = Workload(micro_batch=args.micro_batch, prompt_len=args.prompt_len, response_len=args.response_len,
                      generation_batch=args.generation_batch, logit_chunk_tokens=args.logit_chunk_tokens)
        knobs = DeepSpeedKnobs(param_persistence_threshold=args.param_persistence_threshold,
                               reduce_bucket_size=args.reduce_bucket_size, prefetch_bucket_size=args.prefetch_bucket_size,
                               max_live_parameters=args.max_live_parameters, overlap_comm=args.overlap_comm,
                               max_reuse_distance=args.max_reuse_distance)
        check_tp(actor, args.tp_size, hw)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"rlhf-ds plan: error: {e}", file=sys.stderr)
        return 2
    if args.recommend:
        rec = recommend(models, hw, wl, knobs, lora_rank=args.lora_rank or 16)
        print(json.dumps(rec.to_dict(), indent=2) if args.json else rec.table())
        return 0 if rec.fits else 1
    plan = plan_job(models, hw, wl, knobs)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> int:  # python -m rlhf_ds.planner
    parser = add_plan_arguments(argparse.ArgumentParser(prog="rlhf-ds plan", description=__doc__.split("\n\n")[0]))
    return run_plan_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
