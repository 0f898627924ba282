"""Generation throughput at hybrid.tp_size 1 vs 2 on 2 ranks: the portable HybridEngine (whole copy per rank) against
the TensorParallelEngine (each rank holds half of every attention/MLP projection, DeepSpeed AutoTP). A script that
prints a table (not a test).

    python benchmarks/tp_generation.py                   # CPU: 2 ranks x 1 thread, small random LLaMA, fp32 (~1-2 min)
    python benchmarks/tp_generation.py --hidden 512 --layers 8 --json tp.json

It saves a random-init LLaMA (`--hidden`, `--layers`, `--heads`, vocab `--vocab`) in a temporary folder, launches
itself through the deepspeed launcher (`--num_gpus 2 --no_local_rank`), builds the ZeRO-3 actor as the tests do
(tests/dist_hybrid_engine.build_actor) and times, on the same greedy fixed-length decoding (`--batch` prompts of
`--prompt-len` random tokens per rank, `--new-tokens`; the new-column count is
printed: decoding stops early only if every row of a batch emits EOS, which a random model practically never does):
  tp 1   HybridEngine.generate: each rank decodes its own batch with a whole copy
  tp 2   TensorParallelEngine.generate (tp_size 2): the two ranks decode the union of their batches together, every
         layer all-reducing across them
Both are timed with their weight sync; calls alternate (tp1, tp2, tp1, ...) after one warm-up each so machine load
hits both alike; medians of `--repeats`. tokens/s counts the new tokens of both ranks per second of wall time (the
slowest rank's time). Greedy tokens of the two engines are compared.

On CPU tensor parallelism is expected to be SLOWER: two ranks doing half the matmuls each add an all-reduce per
layer (twice) per decoding step, and on a shared 2-core machine there is no idle core or memory bandwidth to gain.
Its point is memory (each rank holds about half of the layer weights), not CPU speed.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="prompts per rank")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model_dir(args, path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


# ------------------------------------------------------------------------------------------------- inside each rank
def child(args) -> None:
    import torch
    import torch.distributed as dist

    from rlhf_ds.config import EngineConfig, GenerationConfig
    from rlhf_ds.engine import strategy
    from rlhf_ds.models.loading import load_causal_lm
    from rlhf_ds.rollout.hybrid import HybridEngine
    from rlhf_ds.rollout.tensor_parallel import TensorParallelEngine

    strategy.setup_distributed(timeout_minutes=10)
    r = dist.get_rank()
    eng = EngineConfig(zero_stage=3, lr=1e-5, warmup_ratio=0.0, lr_schedule="constant")
    ds = strategy.ds_config_for(eng, micro_batch_size=args.batch)
    actor = strategy.init_trainable(load_causal_lm(args.child, ds, disable_dropout=True), eng, ds, total_steps=10)
    g = torch.Generator().manual_seed(100 + r)  # each rank its own prompts, as in PPO
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    gen = GenerationConfig(args.new_tokens, do_sample=False)
    engines = {"tp1": HybridEngine(actor, 0, 2), "tp2": TensorParallelEngine(actor, 0, 2, tp_size=2)}

    def call(name):
        dist.barrier()
        t = time.perf_counter()
        sync = engines[name].sync_weights()
        out = engines[name].generate(ids, mask, gen)
        own = time.perf_counter() - t
        slowest = torch.tensor([own])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest), sync, out

    res = {"rank": r, "threads": torch.get_num_threads(), "tp1": [], "tp2": [], "tp1_sync": [], "tp2_sync": []}
    outs = {}
    for name in ("tp1", "tp2"):
        call(name)  # warm-up: builds the copy
    for _ in range(args.repeats):
        for name in ("tp1", "tp2"):
            t, sync, out = call(name)
            res[name].append(t)
            res[name + "_sync"].append(sync)
            outs[name] = out.sequences
    res["greedy_equal"] = bool(torch.equal(outs["tp1"], outs["tp2"]))
    res["new_columns"] = [outs["tp1"].shape[1] - args.prompt_len, outs["tp2"].shape[1] - args.prompt_len]

    def count(m):
        return {"total": sum(p.numel() for p in m.parameters()),
                "layers": sum(p.numel() for n, p in m.named_parameters() if ".layers." in n)}

    res["params_tp1"] = count(engines["tp1"]._plain)
    res["params_tp2"] = count(engines["tp2"]._module)
    every = [None, None]
    dist.all_gather_object(every, res)
    if r == 0:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(every, f)
    strategy.end_rank(0)


# --------------------------------------------------------------------------------------------------------- parent
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        args.json_out = os.environ["TP_BENCH_OUT"]
        child(args)
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="tp_generation_")
    model_dir = os.path.join(work, "llama")
    out = os.path.join(work, "ranks.json")
    build_model_dir(args, model_dir)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TP_BENCH_OUT=out,
               TOKENIZERS_PARALLELISM="false")
    threads = max(1, (os.cpu_count() or 1) // 2)
    env.update(OMP_NUM_THREADS=str(threads), RLHF_DS_THREADS=str(threads))
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "prompt_len", "new_tokens",
                            "repeats")]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(free_port()), os.path.abspath(__file__), *passthrough, "--child", model_dir]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
        return proc.returncode
    with open(out, encoding="utf-8") as f:
        ranks = json.load(f)
    r0 = ranks[0]
    per_call_tokens = 2 * args.batch * args.new_tokens
    rows = {}
    for name in ("tp1", "tp2"):
        s = statistics.median(r0[name])
        rows[name] = {"s_per_call": s, "tokens_per_s": per_call_tokens / s, "sync_s": statistics.median(r0[name + "_sync"])}
    print(f"\nmodel: random LLaMA hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
          f"{args.intermediate}, vocab {args.vocab} ({r0['params_tp1']['total'] / 1e6:.2f} M params), fp32, CPU, "
          f"2 ranks x {r0['threads']} thread(s); {args.batch} prompts x {args.prompt_len} tokens per rank, "
          f"{args.new_tokens} new tokens greedy (columns decoded: {r0['new_columns']}); medians of {args.repeats} (launch + runs {time.time() - t0:.0f}s)\n")
    print("| tp_size | s / call (slowest rank, incl. sync) | of which sync | new tokens/s (both ranks) | layer params per rank | total params per rank |")
    print("|---|---|---|---|---|---|")
    for name, key in (("1 (HybridEngine)", "tp1"), ("2 (TensorParallelEngine)", "tp2")):
        row, cnt = rows[key], r0["params_" + key]
        print(f"| {name} | {row['s_per_call']:.3f} | {row['sync_s']:.3f} | {row['tokens_per_s']:,.0f} | "
              f"{cnt['layers']:,} | {cnt['total']:,} |")
    print(f"\ntp2 / tp1 tokens/s: {rows['tp2']['tokens_per_s'] / rows['tp1']['tokens_per_s']:.2f}x; "
          f"greedy tokens equal: {all(r['greedy_equal'] for r in ranks)}; "
          f"layer params per rank tp2/tp1: {r0['params_tp2']['layers'] / r0['params_tp1']['layers']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows, "ranks": ranks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
