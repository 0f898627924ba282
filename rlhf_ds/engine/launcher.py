"""Running a step under the `deepspeed` launcher from a plain `rlhf-ds ...` call (local ranks on this node)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def deepspeed_command(step_argv: list[str], num_gpus: int, master_port: int | None = None) -> list[str]:
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", str(num_gpus), "--no_local_rank"]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", "rlhf_ds.cli", *step_argv]


def relaunch(step_argv: list[str], num_gpus: int, master_port: int | None = None) -> int:
    """Run `rlhf_ds.cli <step_argv>` on `num_gpus` local ranks; returns the launcher's exit status."""
    env = dict(os.environ)
    # one thread per rank unless told otherwise: CPU ranks must not oversubscribe cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_gpus)))
    return subprocess.call(deepspeed_command(step_argv, num_gpus, master_port), env=env)
