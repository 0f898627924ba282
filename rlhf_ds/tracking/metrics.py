"""Metrics: the local `metrics.jsonl` always, wandb and TensorBoard when enabled, a progress bar — all rank 0 only.

Every call is safe on every rank: other ranks do nothing, so trainers need no `if rank == 0` around logging.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

from rlhf_ds.config import TrackingConfig
from rlhf_ds.utils import atomic_write_text, is_rank0, rank

log = logging.getLogger("rlhf_ds")


def setup_logging(run_dir: str) -> None:
    """Rank 0 logs INFO to the console; every rank logs to `logs/rank{N}.log` (errors from any rank are kept)."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    root = logging.getLogger("rlhf_ds")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    root.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank()}] %(levelname)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank()}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if is_rank0() else logging.ERROR)
    root.addHandler(console)


class MetricsLogger:
    """`history` (the rows of a checkpoint being resumed) replaces what metrics.jsonl held, so rows logged after that
    checkpoint by the interrupted run are not kept twice; `wandb_id` continues that wandb run."""

    def __init__(self, run_dir: str, step_name: str, tracking: TrackingConfig, config: Optional[dict] = None,
                 history: Optional[list[dict]] = None, wandb_id: Optional[str] = None):
        self.enabled = is_rank0()
        self.step_name = step_name
        self.history: list[dict] = list(history or [])
        self.wandb_id = wandb_id
        self._wandb = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in self.history))
        self._file = open(path, "a", encoding="utf-8")
        if tracking.wandb:
            import wandb

            self._wandb = wandb.init(
                id=wandb_id,
                resume="allow" if wandb_id else None,
                project=tracking.wandb_project,
                name=tracking.wandb_run_name or f"{os.path.basename(os.path.abspath(run_dir))}-{step_name}",
                group=tracking.wandb_group,
                tags=tracking.wandb_tags or None,
                job_type=step_name,
                config=config,
                dir=run_dir,
                reinit="finish_previous",
            )
            self.wandb_id = self._wandb.id
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v) for k, v in metrics.items()}
        row = {"step_name": self.step_name, "step": step, "time": time.time(), **clean}
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def summary(self, values: dict) -> None:
        """End-of-step figures: printed as a short block, stored as the wandb run summary."""
        if not self.enabled:
            return
        width = max(len(k) for k in values) if values else 0
        lines = [f"== {self.step_name} summary =="] + [f"  {k:<{width}}  {_fmt(v)}" for k, v in values.items()]
        log.info("\n".join(lines))
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0 (disabled elsewhere), ETA included; `initial` = steps done before a resume."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not is_rank0(), dynamic_ncols=True, mininterval=1.0,
                file=sys.stderr)
