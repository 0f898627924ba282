"""Gao-style over-optimisation on the built-in task: PPO against the proxy RM with and without the KL penalty.

    python benchmarks/overoptimisation.py --run runs/pipeline            # uses <run>/sft and <run>/rm
    python benchmarks/overoptimisation.py --sft S --rm R --betas 0 0.1 --steps 80 --out runs/overopt

Each beta gets its own PPO run (2 ranks, ZeRO-3); the script prints proxy reward, gold reward and KL per 10 steps and
writes `overoptimisation.png` (gold and proxy reward against sqrt(KL), and against step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run_ppo(sft: str, rm: str, beta: float, steps: int, out: str, ranks: int) -> str:
    run_dir = os.path.join(out, f"beta{beta:g}")
    if not os.path.isfile(os.path.join(run_dir, "results.json")):
        cmd = [sys.executable, "-m", "rlhf_ds.cli", "ppo", "--num-gpus", str(ranks), f"output_dir={run_dir}",
               f"actor.model={sft}", f"reward.model={rm}", f"ppo.kl_coef={beta}", f"ppo.steps={steps}"]
        subprocess.run(cmd, check=True)
    return run_dir


def load(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "ppo/gold_reward" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a pipeline run dir holding sft/ and rm/")
    ap.add_argument("--sft")
    ap.add_argument("--rm")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="runs/overoptimisation")
    args = ap.parse_args()
    sft = args.sft or os.path.join(args.run, "sft")
    rm = args.rm or os.path.join(args.run, "rm")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_step) = plt.subplots(1, 2, figsize=(11, 4))
    for beta in args.betas:
        rows = load(run_ppo(sft, rm, beta, args.steps, args.out, args.ranks))
        steps = [r["step"] for r in rows]
        gold = [r["ppo/gold_reward"] for r in rows]
        proxy = [r["ppo/reward"] for r in rows]
        root_kl = [max(r["ppo/kl"], 0.0) ** 0.5 for r in rows]
        print(f"beta={beta:g}")
        print(f"  {'step':>5} {'proxy':>8} {'gold':>8} {'KL':>8}")
        for r in rows[::10] + [rows[-1]]:
            print(f"  {r['step']:>5} {r['ppo/reward']:>8.3f} {r['ppo/gold_reward']:>8.3f} {r['ppo/kl']:>8.3f}")
        ax_kl.plot(root_kl, gold, ".-", label=f"gold, beta={beta:g}")
        ax_kl.plot(root_kl, proxy, "x--", alpha=0.6, label=f"proxy RM, beta={beta:g}")
        ax_step.plot(steps, gold, label=f"gold, beta={beta:g}")
        ax_step.plot(steps, proxy, "--", alpha=0.6, label=f"proxy RM, beta={beta:g}")
    ax_kl.set_xlabel("sqrt(KL to reference) [sqrt nats]")
    ax_step.set_xlabel("PPO step")
    for ax in (ax_kl, ax_step):
        ax.set_ylabel("reward of rollouts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Over-optimisation on the built-in task: proxy reward vs gold reward")
    fig.tight_layout()
    path = os.path.join(args.out, "overoptimisation.png")
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
