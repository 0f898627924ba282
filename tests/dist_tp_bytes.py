"""Bytes of the tensor-parallel generation copy each rank really allocates (ZeRO-3 actor, 2 CPU ranks, tp_size 2).

    deepspeed --num_gpus 2 --no_local_rank tests/dist_tp_bytes.py <llama model folder> <out.json>

The tiny llama of `dist_hybrid_models.build_tiny_models` is loaded as a ZeRO-3 actor; `TensorParallelEngine` builds and
syncs its slice-only copy (rlhf_ds/rollout/tensor_parallel.py). Every rank writes `<out.json>.<rank>`: the bytes of
the copy's parameters and buffers (each tensor once), per kind, and the element size; tests/test_planner.py compares
them with the planner's per-rank figure for the same folder (`ModelSpec.from_pretrained_dir`, tp 2).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_hybrid_engine import build_actor  # noqa: E402
from rlhf_ds.engine import strategy  # noqa: E402
from rlhf_ds.models.loading import load_tokenizer  # noqa: E402
from rlhf_ds.rollout.tensor_parallel import TensorParallelEngine  # noqa: E402


def main() -> None:
    llama, out_path = sys.argv[1], sys.argv[2]
    strategy.setup_distributed(timeout_minutes=5)
    r = dist.get_rank()
    tok = load_tokenizer(llama)
    actor = build_actor(llama, tok)
    engine = TensorParallelEngine(actor, tok.pad_token_id, tok.eos_token_id, tp_size=2)
    engine.sync_weights()
    copy = engine._module  # built (meta -> AutoTP -> to_empty) and filled from the shards
    params = list(copy.parameters())  # each tensor once
    buffers = list(copy.buffers())
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    named = list(copy.named_parameters())
    res = {
        "rank": r, "world": dist.get_world_size(), "tp_group": engine.group_ranks,
        "param_bytes": nbytes(params), "buffer_bytes": nbytes(buffers), "bytes": nbytes(params) + nbytes(buffers),
        "element_size": params[0].element_size(),
        "numel": {"total": sum(p.numel() for p in params),
                  "layers": sum(p.numel() for n, p in named if ".layers." in n),
                  "lm_head": sum(p.numel() for n, p in named if n.startswith("lm_head.")),
                  "embedding": sum(p.numel() for n, p in named if "embed_tokens" in n)},
        "whole_numel": sum(int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()
                           for p in strategy.unwrap(actor).parameters()),
    }
    with open(f"{out_path}.{r}", "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
