"""PPO phase times (generation, scoring, training) under different DeepSpeed ZeRO settings, alternated run by run.

    python benchmarks/zero_settings.py --model llama20m        # today / overlap / overlap with 5e6 and 1e6 buckets
    python benchmarks/zero_settings.py --setting old:actor.engine.zero3_param_persistence_threshold=0 \\
        --setting new:actor.engine.overlap_comm=true,actor.engine.reduce_bucket_size=5000000 --rounds 3
    python benchmarks/zero_settings.py --model llama20m --before 5c79075 --setting new:ppo.packing=false

Each setting is a name and PPO config overrides (applied on top of 2-rank PPO with ZeRO-3 for all four engines).
`--before REV` adds the code of git revision REV (exported to the work folder) with its own defaults as one more
setting, "before": code and settings as they were, against the settings of the code here.
`--model tiny` runs the tiny GPT-2 models of tests/dist_hybrid_models.py; `llama20m` / `opt20m` build (once, in the
work folder, random init) a ~20M-parameter LLaMA-style or OPT-style actor with the byte-level tokenizer, and the reward
model is the same folder with a new scalar head. Settings run in turn, `--rounds` times, so that load on the machine
hits them alike; the table gives the median per-step seconds of each phase over all rounds (step 1, with its warm-up,
left out), from the run's own `timing/*` metrics. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("generation", "scoring", "training")
ROLES = ("actor", "critic", "reference", "reward")


# ~20M-parameter models built for --model (random init): LLaMA 8 x (4 h^2 + 3 h i), OPT 12 x (4 h^2 + 2 h i)
BUILT = {"llama20m": dict(layers=8, hidden=384, heads=6, inter=1536),
         "opt20m": dict(layers=12, hidden=384, heads=6, inter=1536)}
VOCAB = 640  # the byte-level BPE of tests/dist_hybrid_models.py's gpt2


def every_role(**keys) -> list[str]:
    """`engine.<key>=<value>` for all four PPO engines (frozen ones take what applies to them: build_ds_config)."""
    return [f"{role}.engine.{k}={str(v).lower() if isinstance(v, bool) else v}" for role in ROLES for k, v in keys.items()]


def buckets(overlap: bool, elements: int) -> list[str]:
    return every_role(overlap_comm=overlap, reduce_bucket_size=elements, zero3_prefetch_bucket_size=elements)


# `today`: the templates' values before these were config keys; `overlap_5e6`: ds_configs' former
# zero3_overlap_comm.json (DeepSpeed-Chat style); the 20M models fit in one 5e7 bucket, 5e6 / 1e6 split them
DEFAULT_SETTINGS = {"today": buckets(False, 50_000_000), "overlap_5e7": buckets(True, 50_000_000),
                    "overlap_5e6": buckets(True, 5_000_000), "overlap_1e6": buckets(True, 1_000_000)}


def build_models(root: str, kind: str) -> dict[str, str]:
    """{"actor": folder, "reward": folder} for --model: the tests' tiny GPT-2 pair, or a built ~20M model."""
    if kind == "tiny":
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from dist_hybrid_models import build_tiny_models

        models = build_tiny_models(os.path.join(root, "tiny"))
        return {"actor": models["gpt2"], "reward": models["gpt2_rm"]}
    folder = os.path.join(root, kind)
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        import torch
        from transformers import AutoModelForCausalLM, OPTConfig

        from rlhf_ds.config import ArchConfig
        from rlhf_ds.data.builtin_task import BuiltinTask
        from rlhf_ds.steps.pretrain import build_model, train_tokenizer

        torch.manual_seed(0)
        tok = train_tokenizer(BuiltinTask(0).pretrain_corpus(600), VOCAB)
        a = BUILT[kind]
        if kind == "llama20m":
            model = build_model(ArchConfig(type="llama", n_layers=a["layers"], hidden=a["hidden"], n_heads=a["heads"],
                                           intermediate=a["inter"], max_positions=128, vocab_size=VOCAB), tok)
        else:  # build_model knows gpt2 and llama only
            model = AutoModelForCausalLM.from_config(OPTConfig(
                vocab_size=len(tok), hidden_size=a["hidden"], num_hidden_layers=a["layers"], ffn_dim=a["inter"],
                num_attention_heads=a["heads"], max_position_embeddings=128, word_embed_proj_dim=a["hidden"],
                dropout=0.0, attention_dropout=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id))
        tok.save_pretrained(folder)
        model.save_pretrained(folder, safe_serialization=True)
        print(f"built {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {folder}", flush=True)
    return {"actor": folder, "reward": folder}  # reward.model = a causal-LM folder: the backbone with a new head


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"--setting wants NAME:key=value[,key=value...], got {text!r}")
    return name, overrides.split(",")


def export_revision(rev: str, work: str) -> str:
    """A folder holding the package as it is at git revision `rev` (git archive, once)."""
    folder = os.path.join(work, f"code_{rev}")
    if not os.path.isdir(folder):
        archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=True).stdout
        os.makedirs(folder + ".part")
        subprocess.run(["tar", "-x", "-C", folder + ".part"], input=archive, check=True)
        os.replace(folder + ".part", folder)
    return folder


def run_ppo(models: dict, out: str, overrides: list[str], args, code: str = REPO) -> dict[str, list[float]]:
    """Per-step seconds of each phase (step 1 left out) and, under "state_mb", the MB the engines hold per rank;
    `code`: the repository whose rlhf_ds runs."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--no_local_rank",
           "--master_port", str(args.master_port), "--module", "rlhf_ds.cli", "ppo", f"output_dir={out}",
           f"actor.model={models['actor']}", f"reward.model={models['reward']}", f"ppo.steps={args.steps}",
           f"ppo.rollout_batch_size={args.batch}", f"ppo.micro_batch_size={args.batch}",
           f"generation.max_new_tokens={args.new_tokens}", "data.max_seq_len=64", "train.log_every=1",
           "checkpoint.every_minutes=0", "checkpoint.resume=never",
           *[f"{role}.engine.zero_stage=3" for role in ROLES], *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=code + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"PPO failed ({proc.returncode}) with {overrides}:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        held = json.load(f)["state_bytes_per_rank"]
    times = {phase: [r[f"timing/{phase}"] for r in rows if r.get("step", 0) > 1 and f"timing/{phase}" in r]
             for phase in PHASES}
    return {**times, "state_mb": [sum(held.values()) / 2**20]}


def alternate(models: dict, work: str, settings: dict[str, list[str]], args,
              code: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """Every setting in turn, `args.rounds` times: setting -> figure -> values; `code`: setting -> repository."""
    times: dict[str, dict[str, list[float]]] = {name: {p: [] for p in (*PHASES, "state_mb")} for name in settings}
    for r in range(args.rounds):
        for name, overrides in settings.items():
            got = run_ppo(models, os.path.join(work, f"{name}_{r}"), overrides, args, code.get(name, REPO))
            for key, values in got.items():
                times[name][key] += values
            print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                f"{p} {statistics.median(got[p]):.3f} s" for p in PHASES), flush=True)
    return times


def print_table(times: dict[str, dict[str, list[float]]]) -> None:
    print(f"{'setting':<16}" + "".join(f"{p:>12}" for p in PHASES) + f"{'step':>10}{'state MB/rank':>15}")
    for name, figures in times.items():
        med = {p: statistics.median(figures[p]) for p in PHASES}
        print(f"{name:<16}" + "".join(f"{med[p]:>12.3f}" for p in PHASES) + f"{sum(med.values()):>10.3f}"
              + f"{statistics.median(figures['state_mb']):>15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", action="append", type=parse_setting, default=None,
                        help="NAME:key=value,... (repeat); default: " + ", ".join(DEFAULT_SETTINGS))
    parser.add_argument("--model", choices=("tiny", *BUILT), default="tiny",
                        help="tiny: the tests' 0.9M GPT-2; llama20m / opt20m: ~20M-parameter models built here")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="rollout = micro-batch, per rank")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--master-port", type=int, default=29731)
    parser.add_argument("--workdir", default=None, help="keep models and runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every per-step figure to this file")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also run the code of this git revision, with its own defaults, as setting 'before'")
    args = parser.parse_args()
    settings = dict(args.setting) if args.setting else DEFAULT_SETTINGS

    work = args.workdir or tempfile.mkdtemp(prefix="zero_settings_")
    code = {}
    if args.before:
        settings = {"before": [], **settings}
        code["before"] = export_revision(args.before, work)
    models = build_models(os.path.join(work, "models"), args.model)
    times = alternate(models, os.path.join(work, args.model), settings, args, code)
    print(f"\nmedian seconds per PPO step ({args.model}, {args.ranks} ranks, ZeRO-3 x4, rollout {args.batch}/rank, "
          f"{args.new_tokens} new tokens, {args.rounds} alternated rounds of {args.steps} steps, step 1 left out)")
    print_table(times)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "settings": settings, "seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
