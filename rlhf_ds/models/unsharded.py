"""Full, hook-free copies of a (possibly ZeRO-3-partitioned, possibly LoRA-wrapped) causal LM.

Two users: the hybrid engine (every rank generates with such a copy: no ZeRO hooks fire per submodule, which is what
makes gathered generation fast) and saving (rank 0 writes the copy as a Hugging Face folder). LoRA deltas are fused
into the copy's base weights; the training model itself is never modified, so training state stays bit-identical.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from rlhf_ds.engine.params import is_peft, iter_full_params
from rlhf_ds.engine.strategy import gathered


def build_plain(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """An empty-weighted twin of `model`'s base architecture, outside ZeRO (filled by `copy_into`)."""
    base = model.get_base_model() if is_peft(model) else model
    # the random init (overwritten at once) must not draw from the global RNG: the sampling stream of the step that
    # builds the copy would shift, and a resumed run (which builds it at another step) would sample differently
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    plain.generation_config = base.generation_config
    plain.requires_grad_(False)
    return plain.to(device).eval()


@torch.no_grad()
def copy_into(model: torch.nn.Module, plain: Optional[torch.nn.Module], group_size: int = 32, flat: bool = True) -> None:
    """Write `model`'s full weights (LoRA fused) into `plain`, one gathered group at a time (`iter_full_params`).

    Collective: every rank calls it; ranks passing `plain=None` only take part in the gathers.
    """
    targets = {**dict(plain.named_parameters()), **dict(plain.named_buffers())} if plain is not None else {}
    for group in iter_full_params(model, group_size, fuse_lora=True, flat=flat):
        for name, tensor in group:
            if name in targets:
                targets[name].copy_(tensor)


def unsharded_copy(model: torch.nn.Module, device="cpu", all_ranks: bool = False, dtype=None):
    """A plain copy on every rank (`all_ranks`) or on rank 0 only (others get None). Collective."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    dtype = dtype or next(model.parameters()).dtype
    plain = build_plain(model, device, dtype) if (all_ranks or rank0) else None
    copy_into(model, plain)
    return plain


def adapter_state_dict(model: torch.nn.Module) -> Optional[dict]:
    """The LoRA adapter weights in peft's saved naming, gathered to rank 0 (others get None). Collective."""
    from peft import get_peft_model_state_dict

    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    with gathered([p for _, p in named]):
        if rank0:
            state = {n: p.data.detach().to("cpu", copy=True) for n, p in named}
    return get_peft_model_state_dict(model, state_dict=state) if rank0 else None


def save_adapter(model: torch.nn.Module, state: dict, out_dir: str) -> None:
    """A folder `peft.PeftModel.from_pretrained(base, out_dir)` loads."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    model.peft_config["default"].save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "adapter_model.safetensors"))
