"""`rlhf-ds` command line: one subcommand per step; each maps to a step runner and nothing else.

    rlhf-ds <step> [--config run.yaml] [key.sub=value ...] [--num-gpus N]

Under the deepspeed launcher (`deepspeed --num_gpus 2 --module rlhf_ds.cli sft ...`) the step runs in every rank;
from a plain shell `--num-gpus N` starts that launcher for you.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rlhf_ds.config import ConfigError, load_config

# step name -> module with `run(cfg)`; configs come from rlhf_ds.config
TRAINING_STEPS = {
    "pretrain": "rlhf_ds.steps.pretrain",
    "sft": "rlhf_ds.steps.sft",
    "rm": "rlhf_ds.steps.reward",
    "ppo": "rlhf_ds.steps.ppo",
}


def _step_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--num-gpus", type=int, default=0, help="start N local ranks with the deepspeed launcher")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ds", description="RLHF (pretrain, SFT, reward model, PPO) on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    _step_parser(sub, "pretrain", "step 0: train a tokenizer and a small causal LM from scratch")
    _step_parser(sub, "sft", "step 1: supervised fine-tuning")
    _step_parser(sub, "rm", "step 2: reward model from pairwise rankings")
    _step_parser(sub, "ppo", "step 3: PPO against the reward model with a KL penalty (four ZeRO engines, hybrid engine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in TRAINING_STEPS:
        try:
            cfg = load_config(args.command, args.config, args.overrides)
        except ConfigError as e:
            print(f"rlhf-ds {args.command}: config error: {e}", file=sys.stderr)
            return 2
        from rlhf_ds.engine.launcher import relaunch, under_launcher

        if args.num_gpus and not under_launcher():
            rest = [a for a in argv if not a.startswith("--num-gpus") and a != str(args.num_gpus)]
            return relaunch(rest, args.num_gpus, args.master_port)
        importlib.import_module(TRAINING_STEPS[args.command]).run(cfg)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
