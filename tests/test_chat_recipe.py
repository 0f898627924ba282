"""The documented recipe (`examples/chat_rlvr/`) runs as written on a chat checkpoint: a tiny LLaMA-family ChatML model
whose tokenizer has PAD == EOS (`tests/chat_models.py`), GRPO with the rule reward, LoRA, the LoRA base as reference,
budgets from the data; only the sizes a 2-core CPU needs are overridden."""
from __future__ import annotations

import json
import os

from conftest import REPO, read_metrics, run_cli

RECIPE = os.path.join(REPO, "examples", "chat_rlvr")


def test_arithmetic_rule():
    import sys

    sys.path.insert(0, RECIPE)
    try:
        from arithmetic_reward import last_number
    finally:
        sys.path.remove(RECIPE)
    got = last_number(prompts=["q"] * 5, responses=["59 + 63 = 122", "It is -32.", "about 1,234", "none", "12 then 13"],
                      answer=[122, -32, "1234", 5, 12])
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_recipe_runs_as_written_on_a_chat_checkpoint(tmp_path):
    from chat_models import build_chat_model

    model = build_chat_model(str(tmp_path / "chat"), "pad_is_eos")
    out = tmp_path / "run"
    run_cli(["ppo", "--config", os.path.join(RECIPE, "grpo_lora.yaml"), f"actor.model={model}",
             f"output_dir={out}", "actor.engine.precision=fp32", "ppo.steps=2", "generation.max_new_tokens=8",
             "ppo.rollout_batch_size=2", "ppo.n_samples_per_prompt=4", "ppo.grad_accum=1", "data.eval_split=4"],
            ranks=1, timeout=300)
    rows = [r for r in read_metrics(str(out)) if "ppo/kl" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["ppo/reward"] <= 1.0 for r in rows)  # the rule's range, no penalty added
    with open(out / "logs" / "rank0.log", encoding="utf-8") as f:
        log = f.read()
    assert "reference log-probs from the actor's LoRA base (adapters off)" in log
    assert "old log-probs from the update's own forward" in log
    assert "token budgets from the data: max_prompt_tokens" in log
    assert "uses its EOS '<|im_end|>' as PAD" in log or "<|endoftext|>" in log
    with open(out / "model" / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        base = json.load(f)
    assert saved["vocab_size"] == base["vocab_size"]  # PAD == EOS took an unused token: no growth
    assert os.path.isdir(out / "model" / "adapter")
