"""Running a step under the `deepspeed` launcher from a plain `rlhf-ds ...` call (local ranks on this node)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped by a signal, checkpoint saved, run me again" (launch/slurm.sbatch)


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
    return call_forwarding_stop_signals(deepspeed_command(step_argv, num_gpus, master_port), env)


def call_forwarding_stop_signals(cmd: list[str], env: dict) -> int:
    """Run `cmd` (a launcher, or one rank) and pass SIGTERM/SIGUSR1 sent to this process on to the ranks under it.

    The ranks then finish their step, save a checkpoint and exit 75, which the launcher passes back. The signal goes
    to the ranks only: DeepSpeed's launcher answers SIGTERM by terminating its ranks and exiting 1, and it is started
    with SIGUSR1 ignored so that a group-wide SIGUSR1 (Slurm's `--signal`) cannot kill it either.
    """
    import psutil

    proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))

    def forward(signum, frame):
        for process in rank_processes(proc.pid):
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def rank_processes(pid: int) -> list:
    """The rank processes below `pid` (the topmost ones with RANK in their environment; their own helper processes
    inherit it), or `pid` itself when it is the rank."""
    import psutil

    try:
        top = psutil.Process(pid)
        found = []
        for p in [top, *top.children(recursive=True)]:
            try:
                if "RANK" in p.environ():
                    found.append(p)
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
        pids = {p.pid for p in found}
        return [p for p in found if p.ppid() not in pids] or [top]
    except psutil.NoSuchProcess:
        return []
