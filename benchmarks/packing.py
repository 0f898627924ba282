"""SFT and reward-model training throughput with and without padding-free packing (`train.packing`) on a length-skewed
dataset, 2 ranks, ZeRO-3, through the real CLI.

    python benchmarks/packing.py                      # LLaMA-style 4.4M model, lengths 10-500 tokens, 2 rounds
    python benchmarks/packing.py --rounds 3 --steps 8 --json packing.json

The script writes (once, in --workdir) a random-init LLaMA-style model with the built-in byte-level tokenizer, and
SFT rows and preference pairs whose lengths follow a long-tailed (log-normal) distribution clipped to 10-500 tokens:
most examples are short and a few are long, so a padded micro-batch is mostly padding. Then `rlhf-ds sft` and
`rlhf-ds rm` run with packing off and on, alternated run by run (`--rounds` times), each for `--steps` optimizer steps,
and the table gives the median of each run's own `train_tokens_per_s` / `train_pairs_per_s` (real tokens only, the
same count either way). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 640
MAX_LEN = 512


def build(work: str, args) -> dict[str, str]:
    """The model folder and the SFT / preference files (reused when present)."""
    paths = {"model": os.path.join(work, "model"), "sft": os.path.join(work, "sft.jsonl"),
             "pref": os.path.join(work, "pref.jsonl")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import torch

    from rlhf_ds.config import ArchConfig
    from rlhf_ds.data.builtin_task import BuiltinTask
    from rlhf_ds.steps.pretrain import build_model, train_tokenizer

    torch.manual_seed(0)
    corpus = BuiltinTask(0).pretrain_corpus(600)
    tok = train_tokenizer(corpus, VOCAB)
    model = build_model(ArchConfig(type="llama", n_layers=args.layers, hidden=args.hidden, n_heads=args.heads,
                                   max_positions=MAX_LEN, vocab_size=VOCAB), tok)
    model.save_pretrained(paths["model"], safe_serialization=True)
    tok.save_pretrained(paths["model"])
    words = " ".join(corpus).split()
    rng = np.random.default_rng(0)

    def text(n_tokens: int) -> str:  # about n_tokens tokens of the corpus' language, cut to exactly n_tokens
        start = int(rng.integers(0, len(words) - n_tokens))
        ids = tok(" ".join(words[start : start + n_tokens]), add_special_tokens=False)["input_ids"][:n_tokens]
        return tok.decode(ids)

    def length() -> int:  # long-tailed: median ~45 tokens, a few near 500
        return int(np.clip(rng.lognormal(3.8, 0.9), 10, 500))

    with open(paths["sft"], "w", encoding="utf-8") as f:
        for _ in range(args.rows):
            n = length()
            f.write(json.dumps({"prompt": text(max(n // 4, 4)), "response": text(max(n - n // 4, 4))}) + "\n")
    with open(paths["pref"], "w", encoding="utf-8") as f:
        for _ in range(args.rows):
            n = length()
            p = text(max(n // 4, 4))
            f.write(json.dumps({"prompt": p, "chosen": text(max(n - n // 4, 4)), "rejected": text(length())}) + "\n")
    print(f"built a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter LLaMA-style model and "
          f"{args.rows} SFT rows / pairs in {work}", flush=True)
    return paths


def run(step: str, paths: dict, out: str, packing: bool, args) -> dict:
    data = paths["sft"] if step == "sft" else paths["pref"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--no_local_rank",
           "--master_port", str(args.master_port), "--module", "rlhf_ds.cli", step, f"output_dir={out}",
           f"model={paths['model']}", f"data.train={data}", f"data.max_seq_len={MAX_LEN}",
           f"data.max_prompt_tokens={MAX_LEN // 2}", f"train.micro_batch_size={args.micro}",
           f"train.max_steps={args.steps}", "train.eval_every=0", "train.log_every=1", "engine.zero_stage=3",
           f"train.packing={str(packing).lower()}", "checkpoint.every_minutes=0", "checkpoint.resume=never"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{step} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=16, help="sequences (pairs for rm) per micro-batch per rank")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--master-port", type=int, default=29741)
    parser.add_argument("--workdir", default=None, help="keep the model, data and runs here (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="packing_")
    paths = build(work, args)
    figures: dict[str, list[float]] = {}
    units = {"sft": "train_tokens_per_s", "rm": "train_pairs_per_s"}
    for r in range(args.rounds):
        for step in ("sft", "rm"):
            for packing in (False, True):
                name = f"{step} {'packed' if packing else 'padded'}"
                got = run(step, paths, os.path.join(work, f"{step}_{int(packing)}_{r}"), packing, args)[units[step]]
                figures.setdefault(name, []).append(got)
                print(f"round {r + 1}/{args.rounds} {name}: {got:.1f} {units[step][6:]}", flush=True)
    print(f"\n{args.ranks} ranks, ZeRO-3, micro-batch {args.micro}/rank, {args.steps} steps per run, lengths 10-500 "
          f"tokens (log-normal), medians of {args.rounds} alternated rounds")
    print(f"{'run':<14}{'median':>12}  unit          {'packed / padded':>16}")
    for step in ("sft", "rm"):
        padded, packed = (statistics.median(figures[f"{step} {k}"]) for k in ("padded", "packed"))
        print(f"{step + ' padded':<14}{padded:>12.1f}  {units[step][6:]:<14}")
        print(f"{step + ' packed':<14}{packed:>12.1f}  {units[step][6:]:<14}{packed / padded:>16.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
