"""DeepSpeed JSON: the package's templates (`rlhf_ds/ds_templates/`), filled from the run config (the one source of
truth), then a user's `engine.ds_config` file merged over it.

Templates hold what rarely changes (contiguous gradients, logging); batch sizes, precision, stage, offload, clipping and
the ZeRO knobs that trade memory for speed (overlap_comm, bucket sizes, ZeRO-3 prefetch/live/reuse/persistence) always
come from `EngineConfig`/`TrainConfig`, so they cannot disagree with what the trainer does or what the planner
counts, and a user's file may not set them (examples of such files: `ds_configs/`).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

from rlhf_ds.config import ConfigError, EngineConfig, deep_merge
from rlhf_ds.engine.optimizers import ds_config_overrides

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ds_templates")

# DeepSpeed keys (dotted) filled from the run config -> the key that sets them; a user's ds_config file may not set them
_BATCH = "the step's micro_batch_size / grad_accum"
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": _BATCH, "train_batch_size": _BATCH, "gradient_accumulation_steps": _BATCH,
    "gradient_clipping": "engine.grad_clip", "bf16": "engine.precision", "fp16": "engine.precision",
    "optimizer": "engine.optimizer", "scheduler": "engine.lr_schedule", "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_param": "engine.offload_params",
    "zero_optimization.offload_optimizer": "engine.offload_optimizer",
    "zero_optimization.stage3_param_persistence_threshold": "engine.zero3_param_persistence_threshold",
    "zero_optimization.overlap_comm": "engine.overlap_comm",
    "zero_optimization.reduce_bucket_size": "engine.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "engine.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size": "engine.zero3_prefetch_bucket_size",
    "zero_optimization.stage3_max_live_parameters": "engine.zero3_max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance": "engine.zero3_max_reuse_distance",
}


def template_name(engine: EngineConfig, inference: bool) -> str:
    if inference and engine.zero_stage == 3:
        return "zero3_inference.json"
    if engine.zero_stage == 3:
        return "zero3_offload.json" if (engine.offload_params or engine.offload_optimizer) else "zero3.json"
    return "zero0.json" if engine.zero_stage == 0 else "zero2.json"


def load_template(name: str, template_dir: Optional[str] = None) -> dict:
    path = os.path.join(template_dir or TEMPLATE_DIR, name)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_ds_config(
    engine: EngineConfig,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    inference: bool = False,
    template_dir: Optional[str] = None,
) -> dict:
    """Fill a template; every 'auto' left in it is resolved here, never by DeepSpeed's guessing."""
    cfg = copy.deepcopy(load_template(template_name(engine, inference), template_dir))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["train_batch_size"] = micro_batch_size * (1 if inference else grad_accum) * world_size
    if inference:
        cfg.pop("gradient_accumulation_steps", None)
        cfg.pop("gradient_clipping", None)
    else:
        cfg["gradient_accumulation_steps"] = grad_accum
        cfg["gradient_clipping"] = engine.grad_clip
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = engine.zero_stage
    zero.update(zero_knobs(engine, inference))
    if engine.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True} if engine.offload_params else {"device": "none"}
    if not inference and engine.zero_stage >= 1:
        zero["offload_optimizer"] = (
            {"device": "cpu", "pin_memory": True} if engine.offload_optimizer else {"device": "none"}
        )
    cfg["bf16"] = {"enabled": engine.precision == "bf16"}
    cfg["fp16"] = {"enabled": engine.precision == "fp16", "initial_scale_power": 12, "loss_scale_window": 100}
    if not inference:
        # keys DeepSpeed needs to accept our client optimizer (8-bit states under ZeRO, non-DeepSpeed Adam offloaded)
        cfg.update(ds_config_overrides(engine.optimizer, engine.zero_stage, engine.offload_optimizer))
    if engine.ds_config:
        cfg = deep_merge(cfg, read_user_ds_config(engine.ds_config))
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ValueError(f"DeepSpeed template {template_name(engine, inference)} leaves 'auto' for: {leftover}")
    return cfg


def zero_knobs(engine: EngineConfig, inference: bool = False) -> dict:
    """The `zero_optimization` knobs `engine.*` sets, those that apply to its stage: ZeRO-3's parameter gathering
    (also for a frozen ZeRO-3 model), gradient reduction for a trained model, the ZeRO-1/2 all-gather bucket."""
    knobs: dict = {}
    if engine.zero_stage == 3:
        knobs.update(stage3_prefetch_bucket_size=engine.zero3_prefetch_bucket_size,
                     stage3_max_live_parameters=engine.zero3_max_live_parameters,
                     stage3_max_reuse_distance=engine.zero3_max_reuse_distance,
                     stage3_param_persistence_threshold=engine.zero3_param_persistence_threshold)
    if engine.zero_stage >= 1 and not inference:
        knobs.update(overlap_comm=engine.overlap_comm, reduce_bucket_size=engine.reduce_bucket_size)
    if engine.zero_stage in (1, 2):
        knobs["allgather_bucket_size"] = engine.allgather_bucket_size
    return knobs


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def read_user_ds_config(path: str) -> dict:
    """A user's DeepSpeed keys (`engine.ds_config`), checked: a JSON object that sets none of OWNED_KEYS."""
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"engine.ds_config {path}: not a readable JSON file: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.ds_config {path}: the top level must be a JSON object of DeepSpeed keys")
    owned = [f"{k} (set {owner})" for k, owner in OWNED_KEYS.items() if _has(user, k)]
    if owned:
        raise ConfigError(f"engine.ds_config {path} sets keys the run config owns: {'; '.join(owned)}")
    return user


def _has(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True

