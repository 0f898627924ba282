"""The hybrid engine: the actor switches between training mode (ZeRO-3 sharded) and generation mode every PPO step.

Generation mode, portable path (default, runs on CPU and GPU):
  1. the actor's partitioned parameters are gathered in groups of `gather_group_size` tensors (the memory budget of
     the gather) and copied, LoRA deltas fused in, into a plain hook-free copy of the architecture (plain ZeRO-3
     shards: one flat all-gather per group, `gather_shards_into`; otherwise `GatheredParameters`, `copy_into`);
  2. that copy decodes with Hugging Face `generate` and its KV cache, dropout off (eval mode), on every rank
     independently — ranks never wait for each other during decoding, so different response lengths cannot hang;
  3. back in training mode nothing needs undoing: the training module, its shards and optimizer state were only read.
Measured on CPU (shared/notes): ZeRO-3 hooks firing per submodule make gathered-in-place generation ~5x slower than
the same weights in a plain module, which is why the copy exists. The copy is kept between steps (`keep_copy`) to
avoid re-allocating it, or released after each rollout when memory is tight.

DeepSpeed's own CUDA hybrid engine can be chosen with `backend="deepspeed"` where it exists (CUDA, supported model
families); it fails on CPU ("not implemented on CPU backend"), so it is refused there with a clear message.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_ds.engine import strategy
from rlhf_ds.models.unsharded import build_plain, copy_into, is_peft

# model families DeepSpeed's inference containers support for its hybrid engine
DEEPSPEED_HYBRID_FAMILIES = {"opt", "bloom", "gptj", "gpt_neo", "gpt_neox", "llama", "internlm"}


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, P + R]: left-padded prompts, then responses (pads after the first EOS)
    prompt_len: int  # P
    seconds: float
    sync_seconds: float


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


@torch.no_grad()
def gather_shards_into(module: torch.nn.Module, plain: torch.nn.Module, group_size: int) -> bool:
    """Fill `plain` from the ZeRO-3 shards with one all-gather per group of `group_size` tensors; False (nothing done)
    where the layout does not allow it. Collective. Reads the shards only: no ZeRO parameter state changes.

    Measured on CPU (gloo, 2 ranks, 52 tensors): ~3 ms against ~23 ms for `GatheredParameters`, which all-gathers
    tensor by tensor and re-partitions afterwards -- the weight sync was a third of a rollout's time.
    """
    layout = _shard_layout(module)
    if layout is None:
        return False
    named, group, world = layout
    targets = dict(plain.named_parameters())
    for i in range(0, len(named), group_size):
        chunk = named[i : i + group_size]
        local = torch.cat([p.ds_tensor.reshape(-1) for _, p in chunk])
        full = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(full, local, group=group)
        full = full.view(world, -1)
        offset = 0
        for name, p in chunk:
            n = p.ds_tensor.numel()
            targets[name].copy_(full[:, offset : offset + n].reshape(-1)[: p.ds_numel].view(p.ds_shape))
            offset += n
    buffers = dict(plain.named_buffers())
    for name, b in module.named_buffers():
        if name in buffers:
            buffers[name].copy_(b)
    return True


def check_backend(backend: str, model_type: str) -> None:
    if backend == "portable":
        return
    if backend != "deepspeed":
        raise ValueError(f"hybrid.backend must be 'portable' or 'deepspeed', got {backend!r}")
    if strategy.on_cpu():
        raise ValueError("hybrid.backend=deepspeed needs CUDA inference kernels (DeepSpeed fails on CPU with "
                         "'This op had not been implemented on CPU backend'); use hybrid.backend=portable")
    if model_type not in DEEPSPEED_HYBRID_FAMILIES:
        raise ValueError(f"DeepSpeed's hybrid engine does not support '{model_type}' models "
                         f"(only {sorted(DEEPSPEED_HYBRID_FAMILIES)}); use hybrid.backend=portable")


class HybridEngine:
    def __init__(self, actor_engine, pad_token_id: int, eos_token_id: int, backend: str = "portable",
                 gather_group_size: int = 32, keep_copy: bool = True, dtype: torch.dtype | None = None):
        self.actor = actor_engine
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.backend = backend
        self.group_size = gather_group_size
        self.keep_copy = keep_copy
        self.dtype = dtype
        self._plain = None

    def _generation_module(self) -> torch.nn.Module:
        module = strategy.unwrap(self.actor)
        if self._plain is None:
            dtype = self.dtype or next(module.parameters()).dtype
            self._plain = build_plain(module, strategy.device(), dtype)
        if not gather_shards_into(module, self._plain, self.group_size):
            copy_into(module, self._plain, self.group_size)  # LoRA fused, any stage
        return self._plain

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, do_sample: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> GenerationOutput:
        """Responses for left-padded prompts. Collective (the gather) but decoding is rank-local."""
        t0 = time.time()
        # DeepSpeed's CUDA hybrid engine switches modes inside engine.generate itself
        model = self.actor if self.backend == "deepspeed" else self._generation_module()
        t_sync = time.time() - t0
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.pad_token_id,
                      eos_token_id=self.eos_token_id, use_cache=True)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
        dev = strategy.device()
        out = model.generate(input_ids=prompt_ids.to(dev), attention_mask=prompt_mask.to(dev), **kwargs)
        if not self.keep_copy:
            self._plain = None
        return GenerationOutput(out, prompt_ids.shape[1], time.time() - t0, t_sync)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of response tokens up to and including the first EOS, and whether each response has an EOS.

    Tokens after the first EOS are padding: masked out of rewards, values and losses.
    """
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_first_eos).long(), has_eos

