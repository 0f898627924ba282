"""Training throughput (preference pairs per second) of `rlhf-ds dpo` against TRL's `DPOTrainer`.

Same tiny GPT-2 and tokenizer (a short `rlhf-ds pretrain` on the built-in task, or `--model`), same pairs (the built-in
task's pref_train.jsonl), same micro-batch, sequence limit, loss (sigmoid, beta 0.1), learning rate and number of
optimizer steps, fp32, one process, the same CPU threads, and a live reference model in both (each step scores the
pairs with the frozen reference). Throughput is pairs trained / seconds of the training loop as each tool reports it:
`train_pairs_per_s` of `rlhf-ds dpo` (loop start to last step), `steps x batch / train_runtime` for TRL.

TRL is not a dependency of rlhf_ds: this script installs it (`--trl-version`) into its own virtual environment
(`--venv`) whose .pth file adds this interpreter's site-packages, so both tools run on the same torch/transformers
build. Runs alternate (rlhf-ds ZeRO-0, rlhf-ds ZeRO-3, TRL) `--repeats` times; the best of each is reported, since
other jobs on a shared machine only ever slow a run down.

    python benchmarks/dpo_vs_trl.py                         # ~5 min on 2 CPU cores, plus the TRL install
    python benchmarks/dpo_vs_trl.py --steps 100 --batch 16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRL_RUNNER = textwrap.dedent("""
    import json, sys, time
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import trl
    from trl import DPOConfig, DPOTrainer

    a = json.loads(sys.argv[1])
    torch.manual_seed(a["seed"])
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    data = load_dataset("json", data_files=a["data"], split="train").select_columns(["prompt", "chosen", "rejected"])
    args = DPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"],
                     learning_rate=a["lr"], lr_scheduler_type="cosine", warmup_steps=int(0.05 * a["steps"]), beta=a["beta"],
                     loss_type=["sigmoid"], max_length=a["max_len"], logging_steps=a["steps"], save_strategy="no",
                     report_to=[], use_cpu=True, dataloader_num_workers=0, seed=a["seed"], bf16=False, fp16=False,
                     adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, disable_dropout=True)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok)
    out = trainer.train()
    first = trainer.train_dataset[0]
    print("RESULT " + json.dumps({"trl_version": trl.__version__, "train_runtime": out.metrics["train_runtime"],
                                  "pairs_per_s": a["steps"] * a["batch"] / out.metrics["train_runtime"],
                                  "train_loss": out.metrics.get("train_loss"),
                                  "example_keys": sorted(first.keys())}))
""")


def sh(cmd: list[str], env: dict | None = None, cwd: str = REPO) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def trl_venv(path: str, version: str) -> str:
    """A venv that sees this interpreter's packages (torch, transformers, ...) and has TRL installed; its python."""
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(py):
        sh([sys.executable, "-m", "venv", path])
        inner = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                               text=True, check=True).stdout.strip()
        with open(os.path.join(inner, "outer_site_packages.pth"), "w", encoding="utf-8") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
    probe = subprocess.run([py, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != version:
        sh([py, "-m", "pip", "install", "-q", f"trl=={version}"])
    return py


def env_with(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), RLHF_DS_THREADS=str(threads), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder or step run folder (default: a fresh tiny pretrain run)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (one micro-batch)")
    ap.add_argument("--max-len", type=int, default=64, help="tokens per sequence (prompt + response)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trl-version", default="1.16.0")
    ap.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "rlhf_ds_trl_venv"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="dpo_vs_trl_")
    env = env_with(args.threads)
    cli = [sys.executable, "-m", "rlhf_ds.cli"]
    base = args.model
    if base is None:
        base = os.path.join(work, "base")
        if not os.path.isfile(os.path.join(base, "results.json")):
            print("pretraining a tiny GPT-2 (4 layers, d=128) on the built-in task ...", file=sys.stderr)
            sh([*cli, "pretrain", f"output_dir={base}", "train.max_steps=30", "engine.zero_stage=0"], env)
    data_dir = os.path.join(work, "data")
    if not os.path.isdir(data_dir):
        sh([sys.executable, "-c", f"from rlhf_ds.data.builtin_task import BuiltinTask; BuiltinTask(0).write({data_dir!r})"],
           env)
    pairs = os.path.join(data_dir, "pref_train.jsonl")
    model_dir = os.path.join(base, "model") if os.path.isfile(os.path.join(base, "model", "config.json")) else base
    print("installing TRL into its own venv ...", file=sys.stderr)
    trl_py = trl_venv(args.venv, args.trl_version)
    runner = os.path.join(work, "trl_runner.py")
    with open(runner, "w", encoding="utf-8") as f:
        f.write(TRL_RUNNER)

    def rlhf_ds(stage: int, k: int) -> dict:
        out = os.path.join(work, f"rlhf_ds_z{stage}_{k}")
        sh([*cli, "dpo", "--resume", "never", f"output_dir={out}", f"model={base}", f"data.train={pairs}",
            "data.eval_split=0", f"data.max_seq_len={args.max_len}", f"data.max_prompt_tokens={args.max_len // 2}",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", f"train.log_every={args.steps}",
            "train.eval_every=0", "checkpoint.every_minutes=0", f"engine.lr={args.lr}", "engine.warmup_ratio=0.05",
            f"dpo.beta={args.beta}", f"engine.zero_stage={stage}", f"reference.engine.zero_stage={stage}"], env)
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        return {"pairs_per_s": res["train_pairs_per_s"], "seconds": res["seconds"], "train_loss": res["train_loss"]}

    def trl(k: int) -> dict:
        spec = dict(model=model_dir, data=pairs, out=os.path.join(work, f"trl_{k}"), batch=args.batch, steps=args.steps,
                    lr=args.lr, beta=args.beta, max_len=args.max_len, seed=1234)
        log = sh([trl_py, runner, json.dumps(spec)], env, cwd=work)
        return json.loads([line for line in log.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])

    runs: dict[str, list[dict]] = {"rlhf_ds_zero0": [], "rlhf_ds_zero3": [], "trl": []}
    for k in range(args.repeats):
        runs["rlhf_ds_zero0"].append(rlhf_ds(0, k))
        runs["rlhf_ds_zero3"].append(rlhf_ds(3, k))
        runs["trl"].append(trl(k))
        print(f"repeat {k + 1}: " + ", ".join(f"{n} {r[-1]['pairs_per_s']:.1f} pairs/s" for n, r in runs.items()),
              file=sys.stderr)
    best = {n: max(r["pairs_per_s"] for r in rs) for n, rs in runs.items()}
    summary = {"steps": args.steps, "batch": args.batch, "max_len": args.max_len, "threads": args.threads,
               "trl_version": runs["trl"][0]["trl_version"], "best_pairs_per_s": best,
               "ratio_zero0_vs_trl": best["rlhf_ds_zero0"] / best["trl"],
               "ratio_zero3_vs_trl": best["rlhf_ds_zero3"] / best["trl"], "runs": runs}
    print(f"\nDPO training throughput, 1 process, {args.threads} threads, batch {args.batch} pairs, "
          f"<= {args.max_len} tokens, {args.steps} steps (best of {args.repeats})")
    print(f"  rlhf-ds dpo, ZeRO-0     {best['rlhf_ds_zero0']:8.1f} pairs/s")
    print(f"  rlhf-ds dpo, ZeRO-3     {best['rlhf_ds_zero3']:8.1f} pairs/s")
    print(f"  TRL {summary['trl_version']:<8} DPOTrainer {best['trl']:8.1f} pairs/s")
    print(f"  ratio rlhf-ds / TRL: {summary['ratio_zero0_vs_trl']:.2f} (ZeRO-0), {summary['ratio_zero3_vs_trl']:.2f} (ZeRO-3)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
