"""GRPO against PPO on the same models and the same number of sequences per step: seconds per step by phase and the
bytes the engines hold per rank (GRPO builds, trains and stores no critic).

    python benchmarks/grpo_vs_ppo.py                 # 2 ranks, ZeRO-3 x4, 16 sequences per rank and step
    python benchmarks/grpo_vs_ppo.py --batch 32 --rounds 3

PPO samples `--batch` prompts once each; GRPO samples `--batch / n` prompts `n` times (`--samples`), so both score and
train on `--batch` sequences per rank. The two run in turn, `--rounds` times (see benchmarks/zero_settings.py, whose
runner this uses). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zero_settings import REPO, alternate, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and step (= micro-batch)")
    parser.add_argument("--samples", type=int, default=4, help="GRPO responses per prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--master-port", type=int, default=29733)
    parser.add_argument("--workdir", default=None, help="keep models and runs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.batch % args.samples:
        parser.error("--batch must be a multiple of --samples")
    settings = {"ppo (gae)": ["ppo.advantage_estimator=gae"],
                "grpo": ["ppo.advantage_estimator=grpo", f"ppo.n_samples_per_prompt={args.samples}",
                         f"ppo.rollout_batch_size={args.batch // args.samples}"]}

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from dist_hybrid_models import build_tiny_models

    work = args.workdir or tempfile.mkdtemp(prefix="grpo_vs_ppo_")
    models = build_tiny_models(os.path.join(work, "models"))
    times = alternate(models, work, settings, args)
    print(f"\nmedian seconds per step ({args.ranks} ranks, ZeRO-3 x4, {args.batch} sequences/rank, {args.new_tokens} "
          f"new tokens, {args.rounds} alternated rounds of {args.steps} steps, step 1 left out); state = parameters, "
          "optimizer states and buffers the engines hold at the end, per rank")
    print_table(times)


if __name__ == "__main__":
    main()
