"""Tensor-parallel generation (`hybrid.tp_size` > 1): each rank's generation copy holds only its slice of each layer.

The portable hybrid engine (`rollout/hybrid.py`) gives every rank a whole copy of the actor, so the largest actor that
can generate is the largest that fits whole on one device next to its training shards. Here ranks form tensor-parallel
(TP) groups of `tp_size` consecutive ranks within a node, and the generation copy of each rank holds only its TP slice
of every attention/MLP projection. The layers are DeepSpeed's AutoTP (`deepspeed.init_inference(...,
tensor_parallel=..., replace_with_kernel_inject=False)`): a maintained implementation that runs on CPU with gloo and on
CUDA with NCCL. It splits q/k/v/gate/up by output features (column) and o/down by input features (row, all-reduced), and
the LM head by hidden features; it keeps embeddings and norms whole.

Building the copy without ever holding the full model
  1. the architecture is instantiated on the `meta` device (no storage);
  2. AutoTP replaces its linear layers; on meta tensors it only records the split (no storage either);
  3. `to_empty` allocates this rank's slices (and the whole embedding / norms) on the device, uninitialised;
  4. every sync streams the trained ZeRO-3 actor through `engine.params.iter_full_params` (one gather group of full
     tensors at a time, LoRA fused) and copies, tensor by tensor, only this rank's slice (`narrow` of the full tensor
     along the split dimension AutoTP chose, at the offset of this rank's share) into the preallocated parameter.
  Peak extra memory of a sync is therefore one gather group of full tensors (`gather_group_size`), on top of the
  resident slice-only copy; no rank ever materialises the whole model, not even while building (meta device). Which
  parameter is split along which dimension is read from the AutoTP layer that owns it (`_partition_sizes`,
  `tp_index`); only AutoTP's contiguous column/row layouts are accepted (fused-qkv "sub-parameter" layouts of other
  families are refused at build time rather than filled wrongly), and every parameter and buffer of the copy must be
  written by the first sync or it fails.

Who decodes what (documented choice)
  The ranks of one TP group must run identical decoding steps (every layer all-reduces inside the group). Each rank
  keeps calling `generate` with its OWN prompts, as with the portable engine; inside, the ranks of a group all-gather
  their prompts (one left-padded batch: the union of the group's prompts), the group leader broadcasts its sampling RNG
  state, and the group decodes that batch together. Every TP rank ends with the same full sequences (the layers
  all-reduce their outputs), so no result exchange is needed: each rank returns the rows of its own prompts, with the
  extra left padding the union added stripped again, so its output has exactly the layout the portable engine returns
  (`[B, P + R]`; R may include trailing pad columns because the group's longest response sets the width). Different
  TP groups decode their own prompts independently. The rest of the PPO step is unchanged.

  Sampling RNG: the leader samples from its own global generator (which advances, as with the portable engine); the
  other ranks of the group decode under the leader's state inside `fork_rng`, so their own generators are left as they
  were. A run is reproducible and resumable as long as the leader's RNG is (it is part of the checkpointed state).

Supported families: those whose AutoTP layout is contiguous and verified here (greedy tokens equal to unsharded
generation on 2 CPU ranks): see `TP_FAMILIES`. GPT-2 is refused (DeepSpeed's AutoTP refuses it: its only path is
CUDA kernel injection), as is every family not listed.

CPU note: DeepSpeed's CPU shared-memory all-reduce kernel (`inference_all_reduce` on CPU) reduces over the whole world
and ignores the process group. With TP groups smaller than the world it would mix groups (wrong numbers or a hang), so
the engine switches DeepSpeed's comm backend to the group-aware `torch.distributed.all_reduce` in that case.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from rlhf_ds.config import GenerationConfig
from rlhf_ds.engine import strategy
from rlhf_ds.engine.params import is_peft, iter_full_params, plain_name
from rlhf_ds.rollout.base import GenerationOutput, sampling_kwargs

# model_type -> verified with DeepSpeed AutoTP (contiguous column/row splits, greedy tokens equal to unsharded
# generation on 2 CPU ranks in tests/dist_tensor_parallel.py)
TP_FAMILIES = ("llama", "mistral", "qwen2")


def check_tp_supported(model_type: str) -> None:
    """Refuse model families tensor-parallel generation does not support (call it when the actor is loaded)."""
    if model_type in TP_FAMILIES:
        return
    why = ("DeepSpeed AutoTP refuses it (its only DeepSpeed path is CUDA kernel injection)" if model_type == "gpt2"
           else "it is not among the families verified with DeepSpeed AutoTP here")
    raise ValueError(f"hybrid.tp_size > 1 does not support '{model_type}' models: {why}. Tensor-parallel generation "
                     f"supports {', '.join(TP_FAMILIES)} (LLaMA-style); use hybrid.tp_size=1 for this actor.")


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", dist.get_world_size())))


def tp_group_ranks(world: int, local_world: int, tp_size: int) -> list[list[int]]:
    """The TP groups: `tp_size` consecutive ranks, never across a node (the launcher numbers a node's ranks
    consecutively). Raises ValueError when tp_size does not divide the ranks per node."""
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"hybrid.tp_size must be a positive integer, got {tp_size!r}")
    if local_world % tp_size or world % local_world:
        raise ValueError(f"hybrid.tp_size={tp_size} must divide the number of ranks per node ({local_world}; "
                         f"world size {world}): tensor-parallel groups are formed within a node")
    return [list(range(s, s + tp_size)) for s in range(0, world, tp_size)]


class _MPU:
    """What DeepSpeed's InferenceEngine asks of a model-parallel unit: our TP group. (Passing only `tp_group` is not
    enough in DeepSpeed 0.19: without an mpu it creates its own group of ranks 0..tp_size-1.)"""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.group)

    def get_model_parallel_rank(self):
        return dist.get_rank(self.group)


def _rng_guard():
    """Undo RNG side effects (DeepSpeed's init_inference broadcasts rank 0's RNG state to every rank)."""
    dev = strategy.device()
    devices = [dev.index or 0] if dev.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _alias_names(module: torch.nn.Module) -> dict[str, list[str]]:
    """The name `iter_full_params` streams each of the actor's tensors under -> every (plain) name of that tensor in
    the architecture (a tied embedding is also the LM head, which AutoTP unties and slices on its own)."""
    by_id: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names = by_id.setdefault(id(p), [])
        if plain_name(n) not in names:
            names.append(plain_name(n))
    return {names[0]: names for names in by_id.values()}


class TensorParallelEngine:
    rank_local = False  # decoding is collective over the TP group

    def __init__(self, actor_engine, pad_token_id: int, eos_token_id: int, tp_size: int,
                 gather_group_size: int = 32, keep_copy: bool = True, dtype: Optional[torch.dtype] = None):
        self.actor = actor_engine
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.group_size = gather_group_size
        self.keep_copy = keep_copy
        self.dtype = dtype
        module = strategy.unwrap(actor_engine)
        base = module.get_base_model() if is_peft(module) else module
        check_tp_supported(getattr(base.config, "model_type", ""))
        if not dist.is_initialized():
            raise ValueError("tensor-parallel generation needs the process group (launch with deepspeed)")
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp_size = tp_size
        groups = tp_group_ranks(world, local_world_size(), tp_size)
        self.group, self.group_ranks = None, None
        for ranks in groups:  # every rank creates every group, in the same order (new_group is collective)
            g = dist.new_group(ranks)
            if rank in ranks:
                self.group, self.group_ranks = g, ranks
        self.leader = self.group_ranks[0]
        self._module: Optional[torch.nn.Module] = None
        self._targets: dict[str, list[tuple[str, torch.Tensor, Optional[int], int, int]]] = {}
        self._synced_once = False

    # ---- the slice-only copy ------------------------------------------------------------------------------------
    def _build(self) -> torch.nn.Module:
        """AutoTP layers on the meta device, then this rank's slices allocated (uninitialised; `_sync` fills them).
        Collective over the world (DeepSpeed broadcasts an RNG state from rank 0 while building)."""
        import deepspeed
        from deepspeed.module_inject.layers import (LinearAllreduce, LinearLayer, LmHeadLinearAllreduce,
                                                    TensorParallel_Layer)
        from transformers import AutoModelForCausalLM

        module = strategy.unwrap(self.actor)
        base = module.get_base_model() if is_peft(module) else module
        dtype = self.dtype or next(module.parameters()).dtype
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
        model.generation_config = base.generation_config
        model.requires_grad_(False).eval()
        aliases = _alias_names(module)
        with _rng_guard(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # AutoTP prints its policy
            engine = deepspeed.init_inference(
                model, tensor_parallel={"tp_size": self.tp_size, "tp_group": self.group, "mpu": _MPU(self.group)},
                replace_with_kernel_inject=False, dtype=dtype)
        tp = engine.module
        dev = strategy.device()
        if any(t.is_meta for t in list(tp.parameters()) + list(tp.buffers())):
            tp.to_empty(device=dev)
        tp.requires_grad_(False).eval()

        owners = {f"{mn}.{pn}" if mn else pn: m for mn, m in tp.named_modules()
                  for pn, _ in m.named_parameters(recurse=False)}
        params = dict(tp.named_parameters(remove_duplicate=False))
        full_shapes = {n: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
                       for n, p in module.named_parameters()}
        full_shapes = {plain_name(n): s for n, s in full_shapes.items()}
        targets: dict[str, list] = {}
        for canonical, names in aliases.items():
            if is_peft(module) and ".lora_" in canonical:
                continue  # adapters arrive fused into their base weights
            for name in names:
                if name not in params:
                    raise RuntimeError(f"tensor-parallel copy: the architecture has no parameter {name!r}")
                p = params[name]
                owner = owners[name]
                full = full_shapes.get(canonical)
                if full is None:
                    raise RuntimeError(f"tensor-parallel copy: the actor has no parameter {canonical!r}")
                if isinstance(owner, TensorParallel_Layer):
                    if type(owner) not in (LinearLayer, LinearAllreduce, LmHeadLinearAllreduce):
                        raise NotImplementedError(f"AutoTP layout {type(owner).__name__} of {name} is not supported by "
                                                  f"the streaming weight sync (only contiguous column/row splits)")
                    column = type(owner) is LinearLayer
                    is_bias = name.endswith(".bias")
                    dim = 0 if column else (None if is_bias else 1)
                else:
                    dim = None
                if dim is None:
                    offset, size = 0, 0
                    if tuple(p.shape) != full:
                        raise RuntimeError(f"{name}: replicated in the TP copy but shaped {tuple(p.shape)} != {full}")
                else:
                    sizes = owner._partition_sizes
                    offset, size = sum(sizes[: owner.tp_index]), sizes[owner.tp_index]
                    want = list(full)
                    want[dim] = size
                    if sum(sizes) != full[dim] or list(p.shape) != want:
                        raise RuntimeError(f"{name}: AutoTP slice {tuple(p.shape)} does not match {full} split "
                                           f"{sizes} along dim {dim}")
                targets.setdefault(canonical, []).append((name, p, dim, offset, size))
        for name, b in tp.named_buffers():
            targets.setdefault(name, []).append((name, b, None, 0, 0))
        covered = {t[0] for ts in targets.values() for t in ts}
        if set(params) - covered:
            raise RuntimeError(f"tensor-parallel copy: parameters with no source in the actor: {sorted(set(params) - covered)}")
        self._targets = targets
        self._synced_once = False
        return tp

    @torch.no_grad()
    def _sync(self) -> None:
        """Stream the trained actor's full tensors (one gather group at a time) and keep only this rank's slices."""
        module = strategy.unwrap(self.actor)
        written = set()
        for group in iter_full_params(module, self.group_size, fuse_lora=True):
            for name, full in group:
                for tname, target, dim, offset, size in self._targets.get(name, ()):
                    src = full if dim is None else full.narrow(dim, offset, size)
                    target.copy_(src)
                    written.add(tname)
        if not self._synced_once:
            everything = {t[0] for ts in self._targets.values() for t in ts}
            if written != everything:
                raise RuntimeError(f"tensor-parallel copy: tensors never written by the sync: {sorted(everything - written)}")
            self._synced_once = True

    def sync_weights(self) -> float:
        """Collective over the world: this rank's slices of the trained actor (the TP copy built on first use)."""
        t0 = time.time()
        if self._module is None:
            self._module = self._build()
        self._sync()
        return time.time() - t0

    def release(self) -> None:
        if not self.keep_copy:
            self._module, self._targets = None, {}

    # ---- prompts of the group, decoding together ----------------------------------------------------------------
    def _group_batch(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """All-gather the group's prompts into one left-padded batch; returns it and this rank's row range / width."""
        dev = strategy.device()
        n = self.tp_size
        shape = torch.tensor([prompt_ids.shape[0], prompt_ids.shape[1]], dtype=torch.long, device=dev)
        shapes = [torch.zeros_like(shape) for _ in range(n)]
        dist.all_gather(shapes, shape, group=self.group)
        shapes = [tuple(s.tolist()) for s in shapes]
        max_b, max_p = max(s[0] for s in shapes), max(s[1] for s in shapes)
        mine = dist.get_rank(self.group)

        def padded(t: torch.Tensor, value: int) -> torch.Tensor:
            out = torch.full((max_b, max_p), value, dtype=torch.long, device=dev)
            if t.numel():
                out[: t.shape[0], max_p - t.shape[1]:] = t.to(dev, torch.long)
            return out

        both = torch.stack([padded(prompt_ids, self.pad_token_id), padded(prompt_mask, 0)])
        gathered = [torch.empty_like(both) for _ in range(n)]
        dist.all_gather(gathered, both, group=self.group)
        ids = torch.cat([g[0, : b] for g, (b, _) in zip(gathered, shapes)])
        mask = torch.cat([g[1, : b] for g, (b, _) in zip(gathered, shapes)])
        start = sum(b for b, _ in shapes[:mine])
        return ids, mask, start, max_p, shapes[mine]

    def _leader_rng(self):
        """Decode under the group leader's RNG state: the leader's own generator advances, the others' are restored."""
        dev = strategy.device()
        is_leader = dist.get_rank() == self.leader
        states = [torch.get_rng_state()]
        if dev.type == "cuda":
            states.append(torch.cuda.get_rng_state(dev))
        out = []
        for s in states:
            t = s.to(dev)
            dist.broadcast(t, src=self.leader, group=self.group)
            out.append(t.cpu())
        if is_leader:
            return contextlib.nullcontext()
        guard = _rng_guard()

        @contextlib.contextmanager
        def under_leader_state():
            with guard:
                torch.set_rng_state(out[0])
                if dev.type == "cuda":
                    torch.cuda.set_rng_state(out[1], dev)
                yield

        return under_leader_state()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationConfig) -> GenerationOutput:
        """Responses to this rank's left-padded prompts from the slices of the last sync. Collective over the TP group
        while decoding (`rank_local` is False): every rank of the group calls it alike."""
        if self._module is None:
            raise RuntimeError("generate() before sync_weights(): the tensor-parallel copy holds no weights")
        t0 = time.time()
        ids, mask, start, max_p, (b, p) = self._group_batch(prompt_ids, prompt_mask)
        if ids.shape[0] == 0:  # no rank of the group has prompts: nothing to decode
            out = ids
        else:
            with self._leader_rng():
                out = self._module.generate(input_ids=ids, attention_mask=mask,
                                            **sampling_kwargs(gen, self.pad_token_id, self.eos_token_id,
                                                              gen.max_new_tokens))
        self.last_group_sequences = out  # the whole group's batch (identical on every TP rank; tests check it)
        mine = out[start : start + b, max_p - p :]
        return GenerationOutput(mine, p, time.time() - t0)
