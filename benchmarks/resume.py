"""Interrupt a PPO run with SIGTERM, resume it, and compare it with the same run uninterrupted.

    python benchmarks/resume.py --actor runs/sft --reward runs/rm --ranks 2 --steps 8 --stop-after 3 --out /tmp/resume

Runs `rlhf-ds ppo --num-gpus RANKS` three times: uninterrupted; interrupted by SIGTERM once step `--stop-after` is in
metrics.jsonl (the ranks finish their step, save, exit 75); resumed with the same command. Prints the exit statuses,
the step of the checkpoint, seconds lost to the restart, and per step how many `ppo/*` metrics are exactly equal and
the largest relative difference; and whether the final weights are bit-identical. Any extra arguments are passed on
as config overrides (e.g. `actor.engine.precision=bf16`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def ppo_command(args, out: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_ds.cli", "ppo", "--num-gpus", str(args.ranks), f"output_dir={out}",
            f"actor.model={args.actor}", f"reward.model={args.reward}", f"ppo.steps={args.steps}",
            "train.log_every=1", "checkpoint.every_minutes=0", *args.overrides]


def metrics(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("ppo/")} for r in rows if "ppo/kl" in r}


def run(cmd: list[str], log: str) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def interrupted_run(cmd: list[str], out: str, stop_after: int, log: str) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        path = os.path.join(out, "metrics.jsonl")
        while proc.poll() is None:
            if os.path.exists(path) and max(metrics(out), default=0) >= stop_after:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        return proc.wait(), time.time() - t0


def weights_identical(a: str, b: str) -> dict[str, bool]:
    from safetensors.torch import load_file

    out = {}
    for sub in ("model", "critic"):
        x, y = load_file(os.path.join(a, sub, "model.safetensors")), load_file(os.path.join(b, sub, "model.safetensors"))
        out[sub] = x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actor", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stop-after", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    full, cut = os.path.join(args.out, "uninterrupted"), os.path.join(args.out, "interrupted")

    rc_full, t_full = run(ppo_command(args, full), os.path.join(args.out, "uninterrupted.log"))
    rc_stop, t_stop = interrupted_run(ppo_command(args, cut), cut, args.stop_after, os.path.join(args.out, "stop.log"))
    saved = sorted(d for d in os.listdir(os.path.join(cut, "checkpoints")) if d.startswith("step_")) \
        if os.path.isdir(os.path.join(cut, "checkpoints")) else []
    rc_resume, t_resume = run(ppo_command(args, cut), os.path.join(args.out, "resume.log"))
    print(f"uninterrupted: exit {rc_full}, {t_full:.1f} s")
    print(f"interrupted:   exit {rc_stop} (75 = stopped after saving), {t_stop:.1f} s, checkpoints {saved}")
    print(f"resumed:       exit {rc_resume}, {t_resume:.1f} s; total {t_stop + t_resume:.1f} s vs {t_full:.1f} s")
    if rc_full or rc_resume:
        return 1
    ref, got = metrics(full), metrics(cut)
    worst = 0.0
    for step in sorted(ref):
        keys = sorted(ref[step])
        equal = sum(ref[step][k] == got.get(step, {}).get(k) for k in keys)
        rel = max(abs(ref[step][k] - got[step][k]) / max(abs(ref[step][k]), 1e-12) for k in keys)
        worst = max(worst, rel)
        print(f"step {step:3d}: {equal}/{len(keys)} metrics exactly equal, largest relative difference {rel:.3g}")
    print(f"final weights bit-identical: {weights_identical(full, cut)}; largest relative difference {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
