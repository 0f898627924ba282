"""How `engine.logit_chunk_tokens` trades memory for time: peak RSS and seconds of one forward + backward of
`token_logprobs` (log-probs and entropies, as PPO's update computes them) on a LLaMA-style model with a real chat
vocabulary, for several chunk sizes (0 = the whole logits at once). Each setting runs in a fresh process, so its peak
RSS is its own.

    python benchmarks/logit_chunks.py [--vocab 49152] [--tokens 32x96] [--chunks 0,256,512,1024,2048,4096]

fp32 on CPU (bf16 matmuls are 40-60x slower on AVX2-only CPUs). Prints a table; `--out` writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(vocab: int, batch: int, seq: int, chunk: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ds.models.inputs import token_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                         max_position_embeddings=2048, tie_word_embeddings=True))
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logp, entropy = token_logprobs(model, ids, mask, temperature=0.7, start=seq // 2, with_entropy=True,
                                       chunk_tokens=chunk)
        (logp.mean() + 0.01 * entropy.mean()).backward()
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"vocab": vocab, "batch": batch, "seq": seq, "chunk": chunk, "peak_rss_gb": peak / 1e6,
            "step_rss_gb": (peak - before) / 1e6, "seconds": min(seconds[1:] or seconds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", default="32x96", help="batch x sequence length (the log-probs of the second half)")
    ap.add_argument("--chunks", default="0,256,512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one chunk size
    args = ap.parse_args()
    batch, seq = (int(x) for x in args.tokens.split("x"))
    if args.one is not None:
        print(json.dumps(one(args.vocab, batch, seq, args.one, args.repeats)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--tokens", args.tokens,
                               "--repeats", str(args.repeats), "--one", str(chunk)], capture_output=True, text=True,
                              env=env, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"vocabulary {args.vocab}, {batch} x {seq} tokens ({batch * (seq - seq // 2)} scored), "
          f"{env['OMP_NUM_THREADS']} threads, fp32")
    print(f"{'chunk':>6} {'peak RSS GB':>12} {'step RSS GB':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['chunk']:>6} {r['peak_rss_gb']:>12.2f} {r['step_rss_gb']:>12.2f} {r['seconds']:>8.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
