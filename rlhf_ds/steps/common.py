"""What every step does first: process group, run directory, logging, resolved config, built-in data."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rlhf_ds.config import BuiltinTaskConfig, save_config, to_dict
from rlhf_ds.engine import strategy
from rlhf_ds.tracking.metrics import MetricsLogger, setup_logging
from rlhf_ds.utils import barrier, is_rank0, set_seed, world_size

log = logging.getLogger("rlhf_ds")


@dataclass
class StepContext:
    run_dir: str
    metrics: MetricsLogger


def start_step(cfg, step_name: str) -> StepContext:
    """Join the process group, seed, prepare `cfg.output_dir` (config.yaml, logs/, metrics) on rank 0."""
    strategy.setup_distributed()
    set_seed(cfg.train.seed if hasattr(cfg, "train") else 0)
    run_dir = cfg.output_dir
    if is_rank0():
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    barrier()
    setup_logging(run_dir)
    metrics = MetricsLogger(run_dir, step_name, cfg.tracking, to_dict(cfg))
    log.info("%s: world size %d, device %s, run dir %s", step_name, world_size(), strategy.device(), run_dir)
    return StepContext(run_dir, metrics)


def builtin_data(task: BuiltinTaskConfig, run_dir: str) -> dict[str, str]:
    """The built-in task's files, written once by rank 0 under `<run_dir>/data` (deterministic by seed)."""
    from rlhf_ds.data.builtin_task import BuiltinTask

    out = os.path.join(run_dir, "data")
    if is_rank0():
        BuiltinTask(task.seed).write(out)
    barrier()
    return BuiltinTask.file_paths(out)


def split_eval(train: list, eval_: list | None, fraction: float, seed: int) -> tuple[list, list]:
    """Use the given eval set, or hold out a seeded `fraction` of the training examples."""
    if eval_ is not None or fraction == 0:
        return train, eval_ or []
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(train))
    n_eval = max(1, int(len(train) * fraction))
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]
