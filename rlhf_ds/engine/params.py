"""The one place that turns a trained (ZeRO-sharded, possibly LoRA-wrapped) model into full tensors.

`iter_full_params` yields the model's full parameters a group at a time; everything that needs whole weights reads
them from it: the rollout engines' weight sync, saving (`models/unsharded.copy_into`) and `full_state_dict`. Peak
extra memory is one group of full tensors, which is how a memory budget for the gather is honoured.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from rlhf_ds.engine import strategy

_PEFT_PREFIX = "base_model.model."

NamedTensors = list[tuple[str, torch.Tensor]]


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def plain_name(name: str) -> str:
    """peft parameter name -> the same tensor's name in the un-wrapped model."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")}


def _shard_layout(module: torch.nn.Module):
    """(named parameters, process group, group size) when every parameter is a ZeRO-3 shard in DeepSpeed's layout
    (rank r holds elements [r * n, (r + 1) * n) of the flattened, zero-padded tensor) on this rank's device, all of one
    dtype and group; None otherwise (LoRA, other stages, offloaded or swapped-out parameters)."""
    named = list(module.named_parameters())
    if is_peft(module) or not named or not all(strategy.is_partitioned(p) and hasattr(p, "ds_tensor") for _, p in named):
        return None
    group, dtype, dev = named[0][1].ds_process_group, named[0][1].ds_tensor.dtype, strategy.device()
    world = dist.get_world_size(group)
    for _, p in named:
        t = p.ds_tensor
        if p.ds_process_group is not group or t.dtype != dtype or t.device != dev or t.numel() != -(-p.ds_numel // world):
            return None
    return named, group, world


def _flat_groups(layout, group_size: int) -> Iterator[NamedTensors]:
    """One all-gather per group straight from the shards. Measured on CPU (gloo, 2 ranks, 52 tensors): ~3 ms against
    ~23 ms for `GatheredParameters`, which all-gathers tensor by tensor and re-partitions afterwards."""
    named, group, world = layout
    for i in range(0, len(named), group_size):
        chunk = named[i : i + group_size]
        local = torch.cat([p.ds_tensor.reshape(-1) for _, p in chunk])
        full = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(full, local, group=group)
        full = full.view(world, -1)
        out, offset = [], 0
        for name, p in chunk:
            n = p.ds_tensor.numel()
            out.append((name, full[:, offset : offset + n].reshape(-1)[: p.ds_numel].view(p.ds_shape)))
            offset += n
        yield out


def _gathered_groups(module: torch.nn.Module, group_size: int, fuse_lora: bool) -> Iterator[NamedTensors]:
    """`GatheredParameters` groups: any ZeRO stage, offload and LoRA (each LoRA layer gathered whole and fused)."""
    lora = _lora_layers(module) if fuse_lora and is_peft(module) else {}
    lora_params = {id(p) for m in lora.values() for p in m.parameters()}
    for name, layer in lora.items():
        with strategy.gathered(list(layer.parameters())):
            base = layer.base_layer
            out = [(plain_name(f"{name}.base_layer.weight"),
                    base.weight.data + layer.get_delta_weight(layer.active_adapters[0]))]
            if getattr(base, "bias", None) is not None:
                out.append((plain_name(f"{name}.base_layer.bias"), base.bias.data))
            yield out
    rest = [(n, p) for n, p in module.named_parameters() if id(p) not in lora_params]
    for i in range(0, len(rest), group_size):
        chunk = rest[i : i + group_size]
        with strategy.gathered([p for _, p in chunk]):
            yield [(plain_name(n) if fuse_lora else n, p.data) for n, p in chunk]


@torch.no_grad()
def iter_full_params(module: torch.nn.Module, group_size: int = 32, fuse_lora: bool = True,
                     flat: bool = True) -> Iterator[NamedTensors]:
    """The full parameters of `module`, `group_size` tensors per yielded group, then its buffers as a last group.

    With `fuse_lora` LoRA deltas are folded into the base weights under the plain model's names (what a generation copy
    or a saved model holds); without it every parameter comes as it is, under its own name. `flat` allows the fast
    one-all-gather-per-group path where the shard layout permits it. Collective: every rank must exhaust the iterator.
    The tensors are valid until the next group is requested; copy what you keep. The training state is only read.
    """
    layout = _shard_layout(module) if flat else None
    yield from (_flat_groups(layout, group_size) if layout is not None
                else _gathered_groups(module, group_size, fuse_lora))
    buffers = [(plain_name(n) if fuse_lora else n, b) for n, b in module.named_buffers()]
    if buffers:
        yield buffers


def full_state_dict(module: torch.nn.Module, to_rank0_only: bool = True, group_size: int = 64) -> dict[str, torch.Tensor]:
    """The whole module's parameters and buffers on CPU, unfused, under their own names. Collective; with
    `to_rank0_only` other ranks get an empty dict."""
    keep = (not to_rank0_only) or (not dist.is_initialized()) or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for group in iter_full_params(module, group_size, fuse_lora=False):
        if keep:
            out.update((name, t.detach().to("cpu", copy=True)) for name, t in group)
    return out
