"""Generation throughput of the actor under ZeRO-3: hybrid engine vs naive ZeRO-3 generation vs an unsharded model,
and where the time of a PPO step goes. A script that prints a table (not a test).

    python benchmarks/generation.py                                   # CPU: 2 ranks, tiny GPT-2, fp32
    python benchmarks/generation.py --model-size 125m --device cuda --bf16 --ranks 1

What it does (every path greedy, same weights, same prompts on every rank):
  1. builds a GPT-2 from config in a work folder (tiny: 4 layers, d=128, vocab 512; 125m: GPT-2 small dims, 50257
     vocab) with a BPE tokenizer trained on the built-in task;
  2. launches itself on `--ranks` ranks (deepspeed launcher) where a ZeRO-3 actor engine is timed on
       hybrid   rlhf_ds HybridEngine: grouped gather into a hook-free copy, then HF generate with KV cache
                (timed with the weight sync, and without it)
       naive    `engine.module.generate(..., synced_gpus=True)` on the partitioned parameters (ZeRO-3 hooks gather
                every submodule at every decoding step)
  3. times the unsharded model in this process (one thread on CPU) -- the floor the hybrid engine aims at;
  4. runs a short PPO job (`rlhf_ds.cli ppo`, four ZeRO-3 engines) and splits its step time into weight sync,
     generation, scoring (old/reference log-probs, values, reward) and training.
Figures are medians over `--repeats` timed calls after one warm-up; per-rank figures are the slowest rank's.
On a shared CPU machine timings are noisy: rerun, or compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=512),
    "125m": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
}
TOKENIZER_VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":  # one thread per rank: CPU ranks must not oversubscribe the cores
        threads = max(1, (os.cpu_count() or 1) // args.ranks)
        env.update(OMP_NUM_THREADS=str(threads), RLHF_DS_THREADS=str(threads))
    return env


def launcher(args) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--no_local_rank",
            "--master_port", str(free_port())]


# ---------------------------------------------------------------------------------------------------------------------
# model folder
# ---------------------------------------------------------------------------------------------------------------------
def build_model_dir(size: str, out: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from rlhf_ds.data.builtin_task import BuiltinTask
    from rlhf_ds.steps.pretrain import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(BuiltinTask(0).pretrain_corpus(1000), TOKENIZER_VOCAB)
    dims = dict(SIZES[size])
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    config = GPT2Config(**dims, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def prompts(args, vocab: int):
    """`batch` prompts of exactly `prompt_len` tokens, identical on every rank and in every path."""
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(8, min(vocab, TOKENIZER_VOCAB), (args.batch, args.prompt_len), generator=g)
    return ids, torch.ones_like(ids)


def timed(fns: list, repeats: int, sync) -> tuple[list[list[float]], list]:
    """Median-ready times of each fn, calls interleaved (a, b, a, b, ...) so load changes hit all of them alike."""
    outs = [fn() for fn in fns]  # warm-up: allocations, the hybrid engine's generation copy, kernels
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            outs[i] = fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    return times, outs


# ---------------------------------------------------------------------------------------------------------------------
# ranks: hybrid vs naive under ZeRO-3
# ---------------------------------------------------------------------------------------------------------------------
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    from rlhf_ds.config import EngineConfig
    from rlhf_ds.engine import strategy
    from rlhf_ds.config import GenerationConfig
    from rlhf_ds.rollout.hybrid import HybridEngine
    from rlhf_ds.models.loading import load_causal_lm, load_tokenizer

    strategy.setup_distributed()
    dev, sync = strategy.device(), get_accelerator().synchronize
    precision = "bf16" if args.bf16 else "fp32"
    tok = load_tokenizer(args.model_dir)
    eng = EngineConfig(zero_stage=3, precision=precision)
    ds = strategy.ds_config_for(eng, micro_batch_size=args.batch)
    actor = strategy.init_trainable(load_causal_lm(args.model_dir, ds, precision, disable_dropout=True, tokenizer=tok),
                                    eng, ds, total_steps=10)
    ids, mask = prompts(args, strategy.unwrap(actor).config.vocab_size)
    ids, mask = ids.to(dev), mask.to(dev)
    gen = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    hybrid = HybridEngine(actor, tok.pad_token_id, tok.eos_token_id, gather_group_size=args.gather_group_size)
    syncs: list[float] = []

    def run_hybrid():
        syncs.append(hybrid.sync_weights())
        return hybrid.generate(ids, mask, GenerationConfig(args.new_tokens, do_sample=False)).sequences

    module = strategy.unwrap(actor)

    @torch.no_grad()
    def run_naive():
        return module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                               use_cache=True, synced_gpus=True, **gen)

    # the unsharded model again, inside the rank: same load, same moment as the hybrid engine (like for like)
    plain = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=strategy.torch_dtype(precision)).to(dev).eval()

    @torch.no_grad()
    def run_plain():
        return plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                              use_cache=True, **gen)

    (hybrid_times, plain_times), (hybrid_seq, plain_seq) = timed([run_hybrid, run_plain], args.repeats, sync)
    sync_times = syncs[1:]
    actor.eval()
    (naive_times,), (naive_seq,) = timed([run_naive], args.naive_repeats, sync)
    actor.train()
    res = {
        "rank": dist.get_rank(), "threads": torch.get_num_threads(), "device": str(dev),
        "hybrid_s": hybrid_times, "sync_s": sync_times, "naive_s": naive_times, "plain_in_rank_s": plain_times,
        "new_tokens": int(hybrid_seq.shape[0] * (hybrid_seq.shape[1] - ids.shape[1])),
        "tokens_equal": bool(torch.equal(hybrid_seq.cpu(), naive_seq.cpu())),
        "tokens_equal_unsharded": bool(torch.equal(hybrid_seq.cpu(), plain_seq.cpu())),
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, res)
    if dist.get_rank() == 0:
        with open(args.worker_out, "w", encoding="utf-8") as f:
            json.dump(everyone, f)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------------
# this process: unsharded baseline, PPO step split, table
# ---------------------------------------------------------------------------------------------------------------------
def unsharded(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.device == "cpu":
        torch.set_num_threads(1)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ids, mask = prompts(args, model.config.vocab_size)
    ids, mask = ids.to(dev), mask.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def run():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    (times,), (seq,) = timed([run], args.repeats, sync)
    return {"s": times, "new_tokens": int(seq.shape[0] * (seq.shape[1] - ids.shape[1])), "sequences": seq.cpu().tolist()}


def ppo_split(args, work: str) -> dict:
    out = os.path.join(work, "ppo")
    prec = "bf16" if args.bf16 else "fp32"
    cmd = launcher(args) + [
        "--module", "rlhf_ds.cli", "ppo", f"output_dir={out}", f"actor.model={args.model_dir}",
        f"reward.model={args.model_dir}", f"ppo.steps={args.ppo_steps}", f"ppo.rollout_batch_size={args.batch}",
        f"ppo.micro_batch_size={args.batch}", "ppo.ppo_epochs=1", f"generation.max_new_tokens={args.new_tokens}",
        "train.log_every=1", *[f"{role}.engine.precision={prec}" for role in ("actor", "critic", "reference", "reward")]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"PPO run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if "timing/generation" in r]
    steady = rows[1:] or rows  # step 1 builds the generation copy and warms everything up
    mean = {k: statistics.mean(r[f"timing/{k}"] for r in steady) for k in ("weight_sync", "generation", "scoring", "training")}
    mean["response_length"] = statistics.mean(r["ppo/response_length"] for r in steady)
    mean["steps_averaged"] = len(steady)
    mean["wall_s"] = time.time() - t0
    return mean


def table(args, ranks: list[dict], base: dict, ppo: dict | None) -> str:
    slowest = lambda key: max(statistics.median(r[key]) for r in ranks)  # noqa: E731
    tokens = ranks[0]["new_tokens"]
    hybrid, sync, naive = slowest("hybrid_s"), slowest("sync_s"), slowest("naive_s")
    gen_only = max(statistics.median(h - s for h, s in zip(r["hybrid_s"], r["sync_s"])) for r in ranks)
    base_s, in_rank = statistics.median(base["s"]), slowest("plain_in_rank_s")
    rows = [
        ("(a) hybrid engine, incl. weight sync", hybrid, args.ranks),
        ("(a) hybrid engine, generation only", gen_only, args.ranks),
        ("(b) naive ZeRO-3 (synced_gpus=True)", naive, args.ranks),
        ("(c) unsharded, one process alone" + (", 1 thread" if args.device == "cpu" else ""), base_s, 1),
        ("(c') unsharded, in each rank interleaved with (a)", in_rank, args.ranks),
    ]
    lines = [
        f"model: GPT-2 {args.model_size} ({ranks[0]['params'] / 1e6:.2f}M params), {args.device}, "
        f"{'bf16' if args.bf16 else 'fp32'}; batch {args.batch} x {args.prompt_len}-token prompts, "
        f"{args.new_tokens} new tokens greedy ({tokens} generated per rank); ZeRO-3 on {args.ranks} rank(s), "
        f"{ranks[0]['threads']} thread(s) each; medians of {args.repeats} (naive {args.naive_repeats})",
        "",
        "| generation path | s / batch | new tokens/s per rank | tokens/s all ranks |",
        "|---|---|---|---|",
    ]
    for name, s, n in rows:
        lines.append(f"| {name} | {s:.4f} | {tokens / s:,.0f} | {n * tokens / s:,.0f} |")
    lines.append(f"| weight sync alone (grouped gather into the copy) | {sync:.4f} | | |")
    lines += [
        "",
        f"hybrid / naive (tokens/s, incl. sync): {naive / hybrid:.2f}x   (target >= 3x)",
        f"hybrid / unsharded (tokens/s per rank, incl. sync): vs (c) {base_s / hybrid:.2f}, vs (c') {in_rank / hybrid:.2f};"
        f" excl. sync: vs (c) {base_s / gen_only:.2f}, vs (c') {in_rank / gen_only:.2f}   (target >= 1/1.3 = 0.77)",
        f"greedy tokens on every rank: hybrid == naive: {all(r['tokens_equal'] for r in ranks)}, "
        f"hybrid == unsharded: {all(r['tokens_equal_unsharded'] for r in ranks)}",
    ]
    if ppo:
        total = sum(ppo[k] for k in ("generation", "scoring", "training"))
        lines += [
            "",
            f"PPO step split (rlhf_ds.cli ppo, {args.ppo_steps} steps, mean of the last {ppo['steps_averaged']}; "
            f"rollout {args.batch}/rank, one micro-batch, 1 PPO epoch, sampled, mean response "
            f"{ppo['response_length']:.1f} tokens):",
            "",
            "| phase | s / step | share |",
            "|---|---|---|",
            f"| generation (hybrid engine, incl. weight sync) | {ppo['generation']:.3f} | {ppo['generation'] / total:.0%} |",
            f"|   of which weight sync | {ppo['weight_sync']:.3f} | {ppo['weight_sync'] / total:.0%} |",
            f"| scoring (old/ref log-probs, values, reward) | {ppo['scoring']:.3f} | {ppo['scoring'] / total:.0%} |",
            f"| training (actor + critic updates) | {ppo['training']:.3f} | {ppo['training'] / total:.0%} |",
            f"| total | {total:.3f} | |",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--gather-group-size", type=int, default=32)
    p.add_argument("--ppo-steps", type=int, default=3, help="0 skips the PPO step split")
    p.add_argument("--workdir", default=None, help="keep the model and runs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write every raw figure here")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set when launched as a rank
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        worker(args)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
    work = args.workdir or tempfile.mkdtemp(prefix="rlhf_ds_bench_")
    os.makedirs(work, exist_ok=True)
    args.model_dir = build_model_dir(args.model_size, os.path.join(work, "model"))

    ranks_out = os.path.join(work, "ranks.json")
    cmd = launcher(args) + [os.path.abspath(__file__), "--worker-out", ranks_out, "--model-dir", args.model_dir,
                            *sys.argv[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(ranks_out, encoding="utf-8") as f:
        ranks = json.load(f)
    base = unsharded(args)
    ppo = ppo_split(args, work) if args.ppo_steps > 0 else None
    print(table(args, ranks, base, ppo))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "ranks": ranks, "unsharded": {k: v for k, v in base.items() if k != "sequences"},
                       "ppo": ppo}, f, indent=1)


if __name__ == "__main__":
    main()
