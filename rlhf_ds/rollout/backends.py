"""Rollout backends by name (`hybrid.backend`): a backend is a factory `build(cfg, actor, tokenizer) -> RolloutEngine`
(rollout/base.py) that PPO calls once, on every rank, with its config, the actor's DeepSpeed engine and the tokenizer
(`build_rollout_engine`).

Built in: `portable` (a hook-free copy of the actor per rank, or tensor-parallel slices of it with hybrid.tp_size > 1)
and `deepspeed` (DeepSpeed's CUDA hybrid engine). A plugin adds one with `@BACKENDS.register("name")`. The engines are
imported when a backend is built: config validation reads the names without loading DeepSpeed.
"""
from __future__ import annotations

from rlhf_ds.config import ConfigError
from rlhf_ds.registry import Registry

BACKENDS = Registry("rollout backend")  # name -> build(cfg, actor, tokenizer) -> RolloutEngine


def _refuse_unsupported(check, *args) -> None:
    """Settings this actor or machine cannot run are bad input (exit 2), said before any rollout."""
    try:
        check(*args)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_rollout_engine(cfg, actor, tokenizer):
    """The actor's generation mode: the engine of the backend hybrid.backend names. hybrid.decode is checked first for
    every backend (static_compile is the portable engine's, on CUDA)."""
    from rlhf_ds.rollout.fast_decode import check_decode

    h = cfg.hybrid
    _refuse_unsupported(check_decode, h.decode, h.backend, h.tp_size)
    return BACKENDS.get(h.backend)(cfg, actor, tokenizer)


def _model_type(actor) -> str:
    from rlhf_ds.engine import strategy

    return strategy.unwrap(actor).config.model_type


@BACKENDS.register("portable")
def portable_engine(cfg, actor, tokenizer):
    """A whole copy per rank, or tensor-parallel slices (hybrid.tp_size > 1; collective: it creates process groups)."""
    from rlhf_ds.rollout.hybrid import HybridEngine
    from rlhf_ds.rollout.tensor_parallel import TensorParallelEngine, check_tp_supported

    h = cfg.hybrid
    if h.tp_size > 1:
        _refuse_unsupported(check_tp_supported, _model_type(actor))
        return TensorParallelEngine(actor, tokenizer.pad_token_id, tokenizer.eos_token_id, h.tp_size,
                                    h.gather_group_size, h.keep_copy)
    return HybridEngine(actor, tokenizer.pad_token_id, tokenizer.eos_token_id, "portable", h.gather_group_size,
                        h.keep_copy, decode=h.decode)


@BACKENDS.register("deepspeed")
def deepspeed_engine(cfg, actor, tokenizer):
    """DeepSpeed's CUDA hybrid engine (its model families only)."""
    from rlhf_ds.rollout.hybrid import HybridEngine, check_deepspeed_backend

    h = cfg.hybrid
    _refuse_unsupported(check_deepspeed_backend, _model_type(actor))
    return HybridEngine(actor, tokenizer.pad_token_id, tokenizer.eos_token_id, "deepspeed", h.gather_group_size,
                        h.keep_copy, decode=h.decode)
