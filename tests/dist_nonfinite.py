"""The non-finite-loss guard on real DeepSpeed engines, run under the deepspeed launcher (2 CPU ranks):

    deepspeed --num_gpus 2 --no_local_rank tests/dist_nonfinite.py <zero_stage> <grad_accum> <out.json>

A tiny GPT-2 trains 4 optimizer steps; in step 2 the loss of rank 1's first micro-batch is made NaN (rank 0's stays
finite). Rank 0 writes, per step, whether the full weights changed and stayed finite, and what the guard counted;
then it checks that policy "stop" raises on every rank.
"""
from __future__ import annotations

import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_ds.config import EngineConfig, TrainConfig
from rlhf_ds.engine import strategy
from rlhf_ds.engine.params import full_state_dict
from rlhf_ds.steps.common import NonFiniteGuard, NonFiniteLossError
from rlhf_ds.utils import rank


def main() -> None:
    stage, accum, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    strategy.setup_distributed(timeout_minutes=2)
    engine_cfg = EngineConfig(zero_stage=stage, lr=1e-2, warmup_ratio=0.0, lr_schedule="constant")
    ds = strategy.ds_config_for(engine_cfg, 2, accum)
    with strategy.model_construction(ds):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    engine = strategy.init_trainable(model, engine_cfg, ds, 10)
    guard = NonFiniteGuard(TrainConfig(on_nonfinite_loss="skip", max_nonfinite_steps=5))
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(rank()))
    rows = []
    for step in range(1, 5):
        before = full_state_dict(strategy.unwrap(engine), to_rank0_only=False)
        for micro in range(accum):
            loss = engine(input_ids=x, labels=x).loss
            if step == 2 and micro == 0 and rank() == 1:
                loss = loss * float("nan")
            guard.backward_and_step(engine, loss, step, "test")
        after = full_state_dict(strategy.unwrap(engine), to_rank0_only=False)
        rows.append({"step": step, "changed": sum(not torch.equal(before[k], after[k]) for k in before),
                     "tensors": len(before), "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
                     "skipped": guard.skipped})
    stop = NonFiniteGuard(TrainConfig(on_nonfinite_loss="stop"))
    loss = engine(input_ids=x, labels=x).loss
    try:
        stop.backward_and_step(engine, loss * float("nan") if rank() == 1 else loss, 5, "test")
        stopped = None
    except NonFiniteLossError as e:
        stopped = str(e)
    if rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"steps": rows, "stopped": stopped}, f)


if __name__ == "__main__":
    main()
    strategy.end_rank(0)
