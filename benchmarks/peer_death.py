"""kill -9 of one rank of a 2-rank PPO run (ZeRO-3, `rlhf-ds ppo --num-gpus 2`) at three moments, and how long the job
takes to end: no process of it left, its exit status, the newest checkpoint complete, the re-run resumed.

    python benchmarks/peer_death.py [--work DIR] [--rank 1] [--rounds 1]

Moments: `start-up` (the victim killed 1 s after it appeared: the survivor is importing or meeting its peer),
`loading` (once rank 0 has joined the process group: the survivor reads the data and loads the models), `generation` (the survivor is generating, a rank-local phase with no collective to fail: the rollout of a
step with long responses), `save` (while the checkpoint of a step is being written: its `.tmp-` folder exists).
Each moment gets a fresh launch; the re-run of the last one runs to the end and resumes from the newest checkpoint.
Prints one line per kill and a JSON summary. Run it on an idle machine: the figures are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from conftest import cli_env, free_port, ppo_resume_args  # noqa: E402
from dist_hybrid_models import build_tiny_models  # noqa: E402

from rlhf_ds.checkpoint import checkpoint_problem  # noqa: E402
from rlhf_ds.engine.launcher import rank_processes  # noqa: E402

# long rollouts: generation is most of a step, so a kill at a random point of a step meets the survivor generating
LONG_ROLLOUT = ["generation.max_new_tokens=40", "data.max_seq_len=80", "ppo.rollout_batch_size=8",
                "ppo.micro_batch_size=4", "ppo.steps=40", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]


def start(args: list[str], log_path: str) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w", encoding="utf-8")
    cmd = [sys.executable, "-m", "rlhf_ds.cli", args[0], "--num-gpus", "2", "--master-port", str(free_port()), *args[1:]]
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(threads=1), stdout=log, stderr=subprocess.STDOUT), log


def job_processes(proc: subprocess.Popen) -> list:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ranks_of(proc: subprocess.Popen, timeout: float = 120) -> dict[str, psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {p.environ().get("RANK"): p for p in rank_processes(proc.pid) if p.pid != proc.pid}
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise RuntimeError("2 ranks never appeared")


def steps_logged(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            return max([json.loads(line).get("step", 0) for line in f if "ppo/kl" in line] or [0])
    except (OSError, ValueError):
        return 0


def wait_for(predicate, timeout: float, poll: float = 0.005) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise RuntimeError("timed out")
        time.sleep(poll)


def kill_at(moment: str, args: list[str], run_dir: str, victim_rank: str, log_path: str) -> dict:
    proc, log = start(args, log_path)
    ranks = ranks_of(proc)
    root = os.path.join(run_dir, "checkpoints")
    if moment == "start-up":
        time.sleep(1.0)
    elif moment == "loading":  # rank 0 has joined the process group and reads the data, then loads the models
        wait_for(lambda: "INFO ppo: world size" in open(log_path, encoding="utf-8").read(), 120, poll=0.002)
    elif moment == "generation":
        first = steps_logged(run_dir)
        wait_for(lambda: steps_logged(run_dir) > first + 1, 300, poll=0.002)  # a step just ended: the next rolls out
        time.sleep(0.3)
    elif moment == "save":
        first = steps_logged(run_dir)
        wait_for(lambda: steps_logged(run_dir) > first + 1, 300)
        wait_for(lambda: os.path.isdir(root) and any(d.startswith(".tmp-step_") for d in os.listdir(root)), 300,
                 poll=0.0005)
    everything = job_processes(proc)
    t0 = time.time()
    ranks[victim_rank].kill()
    wait_for(lambda: not any(alive(p) for p in everything), 120, poll=0.01)
    gone = time.time() - t0
    rc = proc.wait(timeout=60)
    log.close()
    with open(log_path, encoding="utf-8") as f:
        text = f.read()
    saved = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    newest = saved[-1] if saved else None
    return {"moment": moment, "seconds_until_no_process": round(gone, 2), "exit_status": rc,
            "signal_named": "SIGKILL" in text, "newest_checkpoint": newest,
            "newest_checkpoint_complete": newest is not None and checkpoint_problem(os.path.join(root, newest)) is None,
            "survivor_saved": "stopped by SIGTERM after step" in text}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/rlhf_ds_peer_death")
    p.add_argument("--rank", default="1", help="the rank to kill (the other survives)")
    p.add_argument("--moments", default="start-up,loading,generation,save")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    models = build_tiny_models(os.path.join(args.work, "models"))
    results = []
    for moment in args.moments.split(","):
        run_dir = os.path.join(args.work, f"ppo_{moment}")
        run_args = ppo_resume_args(models, run_dir, *LONG_ROLLOUT, "--resume", "never")
        result = kill_at(moment, run_args, run_dir, args.rank, os.path.join(args.work, f"{moment}.log"))
        results.append(result)
        print(f"kill -9 rank {args.rank} during {moment}: no process left after {result['seconds_until_no_process']} "
              f"s, exit status {result['exit_status']} (SIGKILL named: {result['signal_named']}), newest checkpoint "
              f"{result['newest_checkpoint']} complete: {result['newest_checkpoint_complete']}", flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
