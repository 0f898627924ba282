"""The only place that talks to DeepSpeed: process group, model construction under ZeRO-3, engines, gathering, saving.

Trainers call these few functions and otherwise read as algorithms (`engine(...)`, `engine.backward(loss)`,
`engine.step()`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from datetime import timedelta
from typing import Iterable, Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from rlhf_ds.config import EngineConfig
from rlhf_ds.engine import startup
from rlhf_ds.engine.ds_config import build_ds_config
from rlhf_ds.engine.optimizers import build_optimizer
from rlhf_ds.utils import world_size


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def setup_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA through the accelerator) and pin this rank's device/threads."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    if on_cpu():
        from rlhf_ds.engine.launcher import threads_per_process  # ranks sharing a host split its usable cores

        torch.set_num_threads(threads_per_process(local_world))
        _without_shm_comm_op()
    else:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`/`rlhf-ds`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        startup.phase(f"process group ({os.environ.get('WORLD_SIZE')} ranks meeting at "
                      f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})")
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            timeout=timedelta(minutes=timeout_minutes),
            verbose=False,
        )
    for line in startup.check_build_locks():  # JIT ops loaded later (CPU Adam, CUDA's fused ops) wait on these
        print(f"rlhf-ds rank {os.environ.get('RANK', '0')}: {line}", file=sys.stderr, flush=True)


def _without_shm_comm_op() -> None:
    """Keep DeepSpeed from loading its CPU shared-memory all-reduce op when it creates its comm backend.

    DeepSpeed JIT-loads that op (`deepspeed_shm_comm`) through torch's extension builder on every CPU start, which
    takes a build lock file even when nothing needs building; a rank killed while holding it left every later start
    on the machine waiting on it forever, silently. Only DeepSpeed's `inference_all_reduce` (AutoTP layers) uses the
    op, and over every local rank rather than the group it is given, which tensor-parallel generation with a TP group
    narrower than the node cannot use; without it that call is the process group's all-reduce over the given group.
    DeepSpeed keeps its op-compatibility table in one module-level dict and reads it before loading the op."""
    import deepspeed.ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def end_rank(code: int, together: bool = True) -> None:
    """Exit this rank with status `code` without the interpreter's finalisers; every rank in a process group leaves
    through here, whatever its status.

    `together`: every rank ended the same way (done, or preempted after a save): meet the others and leave the process
    group first. Otherwise (bad input, a failure) peers may never come to a barrier, so leave at once.

    Left to normal interpreter shutdown with the process group alive, a rank sometimes aborts (SIGABRT, "terminate
    called without an active exception"; 2 of ~80 two-rank launches in one CI run, and the 2-rank exit-2 paths under
    load): gloo's worker threads still hold work objects whose tensors reference Python objects, and destroying them
    while the interpreter is torn down kills the process, turning a complete run or a clean exit 2 into status -6/250.
    `os._exit` runs no C++ destructor at all; the kernel closes the sockets. Outputs are
    already written and closed when a step returns; log handlers are flushed here.
    """
    import logging

    from rlhf_ds.engine.launcher import peers_may_leave

    if together:
        dist.barrier()
    peers_may_leave()  # past the barrier (or leaving alone): a peer that exits now is not a death
    if together:
        dist.destroy_process_group()
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:  # a console nobody reads any more must not keep the status from being reported
        os._exit(code)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# role -> the DeepSpeed config its engine was built with, in this step; StepContext.begin saves them in the run dir
built_ds_configs: dict[str, dict] = {}


# set by the checkpoint manager before any engine is built when it resumes on another world size: trained engines of
# ZeRO stage 1-3 then load DeepSpeed's universal format (`to_universal`), which DeepSpeed decides when it builds one
loading_universal = False


def ds_config_for(engine: EngineConfig, micro_batch_size: int, grad_accum: int = 1, inference: bool = False,
                  role: str = "model") -> dict:
    cfg = build_ds_config(engine, micro_batch_size, grad_accum, world_size(), inference=inference)
    if loading_universal and not inference and engine.zero_stage >= 1:
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    built_ds_configs[role] = cfg
    return cfg


@contextlib.contextmanager
def model_construction(ds_config: dict) -> Iterator[None]:
    """Models built (or `from_pretrained`) inside are created already partitioned when the config is ZeRO-3.

    transformers reads the ZeRO-3 switch from a live `HfDeepSpeedConfig`; it is removed on exit so a later model of
    another stage in the same process (PPO) is not partitioned by mistake. Extra modules (scalar heads) built inside
    go through `deepspeed.zero.Init` too, so they share the backbone's partitioning and dtype.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: transformers holds a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def zero3_init(ds_config: dict):
    """Context for plain torch modules that must be partitioned like a ZeRO-3 backbone (e.g. a value head)."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def _lr_lambda(engine: EngineConfig, total_steps: int):
    warmup = int(engine.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if engine.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if engine.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10%

    return f


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of a (LoRA-wrapped, scalar-head) transformers model, in effect from its next forward."""
    inner = getattr(model, "backbone", model)
    if hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()
    # transformers checkpoints only in training mode; from_pretrained leaves eval mode, which PPO's models never left,
    # so their checkpointing did nothing (they load without dropout: training mode changes nothing else)
    model.train()


def init_trainable(model: torch.nn.Module, engine: EngineConfig, ds_config: dict, total_steps: int):
    """A training engine: only parameters with requires_grad go to the optimizer (LoRA: the adapters)."""
    if engine.gradient_checkpointing:
        enable_checkpointing(model)
    startup.phase("DeepSpeed engine (optimizer, ZeRO partitioning)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        params,
        name=engine.optimizer,
        lr=engine.lr,
        weight_decay=engine.weight_decay,
        betas=tuple(engine.adam_betas),
        offload=engine.offload_optimizer,
        ds_config=ds_config,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(engine, total_steps))
    ds_engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return ds_engine


def init_frozen(model: torch.nn.Module, ds_config: dict):
    """An inference-only engine (reference/reward models): ZeRO-3 keeps it partitioned, no optimizer."""
    startup.phase("DeepSpeed engine (ZeRO partitioning)")
    model.requires_grad_(False)
    ds_engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    ds_engine.eval()
    return ds_engine


def forward_only_pass_done(engine) -> None:
    """Call after a forward-only (no-grad) pass of an engine that is also trained (PPO's scoring, held-out evaluation).

    ZeRO-3 records the order in which one pass (from a forward to the next) runs the modules, then prefetches parameters
    by that order and keeps gathered those the pass uses again (the backward). A recording made in a forward-only pass
    has no backward, so the training pass that follows drops it in its backward, the next forward-only pass records
    again, and every backward gathers each layer anew without prefetch (PPO at ~20M parameters trained 1.4x slower).
    Dropping a forward-only recording makes the next training pass record the whole pass; forward-only passes then
    follow it as a prefix and keep it. A no-op for frozen engines and below ZeRO-3."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is not None and offload.get_param_coordinator().is_record_trace():
        offload.get_param_coordinator()._invalidate_trace()  # DeepSpeed 0.19.8 has no public call for this


def is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: Optional[int] = None):
    """Full parameters inside the block (all ranks take part); a no-op for unpartitioned ones."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def unwrap(engine_or_module) -> torch.nn.Module:
    return getattr(engine_or_module, "module", engine_or_module)


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    """A small tensor reduced over ranks in float64 (every rank sees the same numbers), in its own device and dtype."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = values.detach().to(device(), dtype=torch.float64, copy=True)
        dist.all_reduce(out, op=op)
        return out.to(values.device, values.dtype)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks: how ranks agree on a flag any one of them raised (stop signal, bad loss)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (small things: a decision, a path)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """False when the loss is NaN/inf on any rank (every rank gets the same answer, so all skip or stop together)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    return all_reduce_max(bad).item() == 0.0


def discards_nonfinite_steps(engine) -> bool:
    """Whether DeepSpeed itself drops an optimizer step whose gradients are NaN/inf.

    DeepSpeed 0.19.8: the ZeRO-1/2/3 optimizers, the bf16 optimizer and the fp16 loss scaler check the global gradient
    norm and skip the update (counted in `skipped_steps`); at ZeRO stage 0 in fp32 the torch optimizer applies it and
    the weights become NaN (measured).
    """
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def backward_and_step(engine, loss: torch.Tensor, step_is_finite: bool) -> None:
    """`engine.backward(loss); engine.step()`, dropping the optimizer update when the step saw a non-finite loss.

    Every rank still runs backward and step, so collectives and DeepSpeed's step counters stay in step across ranks.
    Where DeepSpeed does not drop such a step itself, the step runs on zeroed gradients and the weights and optimizer
    state are put back as they were (a copy of them only on this rare path).
    """
    engine.backward(loss)
    if step_is_finite or discards_nonfinite_steps(engine) or not engine.is_gradient_accumulation_boundary():
        engine.step()
        return
    params = [p for p in engine.module.parameters() if p.requires_grad]
    weights = [p.detach().clone() for p in params]
    optimizer_state = copy.deepcopy(engine.optimizer.state_dict())
    for p in params:
        if p.grad is not None:
            p.grad.zero_()
    engine.step()
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    engine.optimizer.load_state_dict(optimizer_state)


def held_bytes(engine) -> int:
    """Bytes of the distinct tensor storages `engine` holds on this rank, each counted once: its parameters (ZeRO-3:
    the shards and anything still gathered), buffers, and whatever its ZeRO optimizer keeps (fp32 master partitions,
    optimizer states, gradient partitions, communication buckets)."""
    seen: set = set()

    def add(t) -> int:
        if not torch.is_tensor(t) or t.device.type == "meta":
            return 0
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    def walk(obj, depth: int) -> int:
        if torch.is_tensor(obj):
            return add(obj)
        if depth == 0 or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            return 0
        if isinstance(obj, dict):
            return sum(walk(v, depth - 1) for v in obj.values())
        if isinstance(obj, (list, tuple, set)):
            return sum(walk(v, depth - 1) for v in obj)
        return sum(walk(v, depth - 1) for v in getattr(obj, "__dict__", {}).values())

    module = unwrap(engine)
    total = sum(add(p.data) + add(getattr(p, "ds_tensor", None)) for p in module.parameters())
    total += sum(add(b) for b in module.buffers())
    optimizer = getattr(engine, "optimizer", None)
    return total + (walk(optimizer, 5) if optimizer is not None else 0)


def grad_norm(engine) -> Optional[float]:
    """The global gradient norm of the engine's last optimizer step (all ranks agree), where DeepSpeed's optimizer
    computes one (ZeRO stages 1-3, mixed precision); None otherwise."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def weights_finite(engine) -> bool:
    """True when every rank's parameters (its ZeRO-3 shards) are finite."""
    bad = any(not torch.isfinite(getattr(p, "ds_tensor", p.data)).all() for p in engine.module.parameters())
    return all_reduce_max(torch.tensor([float(bad)])).item() == 0.0


def save_engine(engine, folder: str, tag: str) -> None:
    """DeepSpeed's own checkpoint of a training engine (module, ZeRO shards of every rank, optimizer, LR scheduler)
    under `folder/tag`. Collective."""
    engine.save_checkpoint(folder, tag=tag, save_latest=False)


def to_universal(folder: str, tag: str, out_folder: str) -> None:
    """DeepSpeed's universal checkpoint of `folder/tag` (a ZeRO stage 1-3 engine's shards, any world size) written to
    `out_folder/tag`, which a run on another world size loads (`loading_universal`). One process; reads `folder`
    only."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=os.path.join(folder, tag), output_folder=os.path.join(out_folder, tag), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))


def zero_stage(engine) -> int:
    return engine.zero_optimization_stage()


def load_engine(engine, folder: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder}/{tag}: DeepSpeed found no checkpoint to load")


def gradient_accumulation_steps(engine) -> int:
    """The micro-batches DeepSpeed divides each backward by (its configured accumulation steps)."""
    return engine.gradient_accumulation_steps()


def set_accumulation_boundary(engine, is_last: bool) -> None:
    """Mark whether the next backward ends the optimizer step, for steps whose micro-batch count varies (token
    budgets) and so cannot follow DeepSpeed's fixed gradient_accumulation_steps."""
    engine.set_gradient_accumulation_boundary(is_last)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor of metrics over ranks (every rank sees the same numbers)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return (_all_reduce(values.to(torch.float64), dist.ReduceOp.SUM) / dist.get_world_size()).to(values.dtype)
    return values
