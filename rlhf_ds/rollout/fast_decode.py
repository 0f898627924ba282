"""The fast GPU decode path of the portable hybrid engine (`hybrid.decode`), chosen by config.

    hybrid.decode = "hf"              today's path: Hugging Face `generate` with its dynamic KV cache, eager forward
    hybrid.decode = "static_compile"  transformers' static KV cache (preallocated, fixed shapes) + `torch.compile` of
                                      the decoding step (mode "reduce-overhead": CUDA graphs), CUDA only

Why: decoding a batch is one forward per token; at small and medium batch the eager forward is bound by kernel-launch
and Python overhead, not by the HBM bandwidth that reading the weights and KV cache needs. A static cache gives every
decoding step the same tensor shapes, so transformers compiles the step once and replays it as a CUDA graph.

How (transformers >= 4.45, verified against 5.x here): `generate(..., cache_implementation="static",
compile_config=CompileConfig(...))` allocates a `StaticCache` and, on CUDA, runs every decoding step through
`model.get_compiled_call(compile_config)` (the prefill stays eager). Nothing else changes: sampling, logits
processors and stopping run as before, so the rollout layout is the one `hybrid.py` already returns.

Recompilation: torch.compile specialises on shapes. The cache length is rounded up to a multiple of `cache_bucket`
tokens (prompt width + max_new_tokens), so rollouts whose prompt widths differ by a few tokens reuse one graph; a new
batch size or bucket compiles once more (torch's recompile limit then falls back to eager). The compiled call is
attached to the model object: keep the generation copy between rollouts (`hybrid.keep_copy`, the default) or every
rollout compiles again. The weight sync (`copy_into`) writes the copy's parameters in place, so captured CUDA graphs
keep reading the current weights.

Refused with a clear message: on a CPU accelerator (transformers never compiles the step there, and CUDA graphs do not
exist), with `hybrid.backend=deepspeed` (DeepSpeed's engine decodes by itself) and with `hybrid.tp_size > 1` (AutoTP's
all-reduce inside a CUDA graph is not verified here). Falls back, with one logged warning, to the "hf" path for model
families without a static-cache / compilable forward (checked up front from transformers' class flags, and
try-and-catch at the first call for what the flags cannot tell).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DECODE_MODES = ("hf", "static_compile")

# errors at the first static/compiled call that mean "this family cannot do it" -> fall back to "hf"
_FALLBACK_ERRORS = (NotImplementedError, ValueError, TypeError, AttributeError, RuntimeError, AssertionError)


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def check_decode(mode: str, backend: str = "portable", tp_size: int = 1, device_name: Optional[str] = None) -> None:
    """Refuse `hybrid.decode` settings that cannot run (call it when the engine is built, before any rollout)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"hybrid.decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "hf":
        return
    device_name = device_name or accelerator_name()
    if device_name != "cuda":
        raise ValueError(f"hybrid.decode=static_compile needs CUDA (a static KV cache decoded through torch.compile "
                         f"CUDA graphs); this run's accelerator is {device_name!r}. Use hybrid.decode=hf here.")
    if backend != "portable":
        raise ValueError(f"hybrid.decode=static_compile is a path of the portable engine (hybrid.backend=portable); "
                         f"hybrid.backend={backend!r} decodes with its own kernels. Use hybrid.decode=hf with it.")
    if tp_size != 1:
        raise ValueError(f"hybrid.decode=static_compile is not supported with hybrid.tp_size={tp_size} (AutoTP's "
                         f"all-reduce inside a compiled CUDA graph is not verified); use hybrid.decode=hf or tp_size=1.")


def static_cache_support(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether `model`'s family can decode with a static cache through a compiled step, and why not.

    Reads transformers' class flags: `_supports_static_cache` (transformers 4.x; gone in 5.x, where every model that
    takes `Cache` objects takes a StaticCache), `_supports_default_dynamic_cache()` (False for stateful / custom-cache
    families: mamba, ...), `_can_compile_fullgraph` (False for families torch.compile cannot trace: MoE top-k routing,
    ...), encoder-decoder models (not what a rollout runs)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        return False, f"{name} is not a Hugging Face generation model"
    if getattr(config, "is_encoder_decoder", False):
        return False, f"{name} is an encoder-decoder model"
    if getattr(type(model), "_supports_static_cache", True) is False:
        return False, f"{name} does not support a static KV cache (_supports_static_cache=False)"
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_cache):
        try:
            if not supports_cache():
                return False, f"{name} manages its own cache (stateful / custom cache), not a static KV cache"
        except Exception as e:  # noqa: BLE001 (a flag we cannot read is a no)
            return False, f"{name}: cannot tell whether it supports a static cache ({type(e).__name__}: {e})"
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return False, f"{name} cannot be compiled by torch.compile (_can_compile_fullgraph=False)"
    if "llama4" in str(getattr(config, "model_type", "")):
        return False, f"{name}: transformers does not compile llama4's decoding step"
    return True, ""


def compile_config(mode: str = "reduce-overhead"):
    """transformers' CompileConfig for the decoding step: CUDA graphs, static shapes, graph breaks allowed."""
    from transformers import CompileConfig

    return CompileConfig(fullgraph=False, dynamic=False, mode=mode)


def fast_generate_kwargs(model: torch.nn.Module, prompt_len: int, max_new_tokens: int, cache_bucket: int = 128,
                         compile_mode: str = "reduce-overhead") -> dict:
    """The extra `generate` keyword arguments of the static-cache + compiled-step path (no device check here)."""
    bucket = max(1, int(cache_bucket))
    max_cache_len = int(math.ceil((prompt_len + max_new_tokens) / bucket) * bucket)
    return dict(cache_implementation="static", max_cache_len=max_cache_len, compile_config=compile_config(compile_mode))


class FastDecoder:
    """The `hybrid.decode` choice for one engine: `generate(model, **kwargs)` decodes through the chosen path.

    Built once per engine (the checks run there, so a CPU run with `static_compile` stops before training). Once a
    family falls back, this decoder stays on "hf" for the rest of the run (one warning)."""

    def __init__(self, mode: str = "hf", backend: str = "portable", tp_size: int = 1, keep_copy: bool = True,
                 cache_bucket: int = 128, compile_mode: str = "reduce-overhead", device_name: Optional[str] = None):
        check_decode(mode, backend, tp_size, device_name)
        self.requested = mode
        self.mode = mode
        self.cache_bucket = cache_bucket
        self.compile_mode = compile_mode
        self.fallback_reason: Optional[str] = None
        self._checked_models: set[int] = set()
        self._first_call_done = False
        if mode == "static_compile" and not keep_copy:
            logger.warning("hybrid.decode=static_compile with hybrid.keep_copy=false: the generation copy is rebuilt "
                           "every rollout, so its decoding step is compiled again every rollout (slow)")

    def _fall_back(self, reason: str) -> None:
        self.mode, self.fallback_reason = "hf", reason
        logger.warning("hybrid.decode=static_compile falls back to hybrid.decode=hf: %s", reason)

    def prepare(self, model: torch.nn.Module) -> str:
        """Check `model`'s family once (per model object); returns the mode that will be used."""
        if self.mode == "static_compile" and id(model) not in self._checked_models:
            ok, why = static_cache_support(model)
            self._checked_models.add(id(model))
            if not ok:
                self._fall_back(why)
        return self.mode

    def generate_kwargs(self, model: torch.nn.Module, prompt_len: int, max_new_tokens: int) -> dict:
        """Extra `generate` kwargs for `model` ({} on the "hf" path)."""
        if self.prepare(model) != "static_compile":
            return {}
        return fast_generate_kwargs(model, prompt_len, max_new_tokens, self.cache_bucket, self.compile_mode)

    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """`model.generate(input_ids=..., **kwargs)` through the chosen path; a failure of the very first static call
        falls back to "hf" (warning) and decodes that batch again on the "hf" path."""
        extra = self.generate_kwargs(model, input_ids.shape[1], int(kwargs.get("max_new_tokens") or 0))
        if not extra:
            return model.generate(input_ids=input_ids, **kwargs)
        if self._first_call_done:
            return model.generate(input_ids=input_ids, **kwargs, **extra)
        try:
            out = model.generate(input_ids=input_ids, **kwargs, **extra)
        except _FALLBACK_ERRORS as e:
            if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
                raise
            self._fall_back(f"the first static-cache/compiled generate of {type(model).__name__} failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return model.generate(input_ids=input_ids, **kwargs)
        self._first_call_done = True
        return out
