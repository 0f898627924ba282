"""Step 3 without the memory a real checkpoint cannot spare, with the same numbers: the LoRA actor's base (adapters off)
as the reference instead of a second copy, log-probs from chunks of hidden states instead of whole-vocabulary logits
(ZeRO-3, 2 ranks), and on-policy updates that take their old log-probs from their own forward."""
from __future__ import annotations

import json
import os

import pytest

from conftest import ppo_metrics_by_step, run_cli

STEPS = 2
# GRPO, a LoRA actor, KL as a loss (kl_coef 0), one epoch: 4 prompts x 2 samples = one optimizer step of 2 x 4
GRPO = [f"ppo.steps={STEPS}", "ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=2", "ppo.rollout_batch_size=4",
        "ppo.micro_batch_size=4", "ppo.grad_accum=2", "ppo.ppo_epochs=1", "ppo.kl_coef=0", "ppo.kl_loss_coef=0.1",
        "generation.max_new_tokens=12", "data.max_seq_len=64", "train.log_every=1", "actor.engine.lora.enabled=true",
        "actor.engine.lora.rank=4", "actor.engine.lr=5e-3", "checkpoint.every_minutes=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    from dist_hybrid_models import tiny_models

    models = tiny_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("ppo_memory")
    common = ["ppo", f"actor.model={models['gpt2']}", f"reward.model={models['gpt2_rm']}", *GRPO]
    variants = {
        # the defaults: the LoRA base is the reference; chunks of 16 tokens (a micro-batch holds ~100 response tokens)
        "lora_base": ["actor.engine.logit_chunk_tokens=16"],
        # the same with a separate frozen copy of the same weights as the reference
        "separate": ["actor.engine.logit_chunk_tokens=16", "reference.engine.logit_chunk_tokens=16",
                     f"reference.model={models['gpt2']}"],
        # whole logits and the separate old-log-prob pass
        "unchunked": ["actor.engine.logit_chunk_tokens=0", "ppo.old_logprobs_from_update=false"],
    }
    out = {}
    for name, extra in variants.items():
        out[name] = str(root / name)
        run_cli([*common, f"output_dir={out[name]}", *extra], ranks=2, timeout=400)
    return out


def log_text(run_dir: str) -> str:
    with open(os.path.join(run_dir, "logs", "rank0.log"), encoding="utf-8") as f:
        return f.read()


def assert_same(a: dict, b: dict, steps, rel: float) -> None:
    for step in steps:
        assert set(a[step]) == set(b[step])
        for key, value in b[step].items():
            assert a[step][key] == pytest.approx(value, rel=rel, abs=rel), (step, key, a[step][key], value)


def test_lora_base_reference_equals_a_separate_frozen_reference(runs):
    base, separate = ppo_metrics_by_step(runs["lora_base"]), ppo_metrics_by_step(runs["separate"])
    assert sorted(base) == sorted(separate) == list(range(1, STEPS + 1))
    assert_same(base, separate, range(1, STEPS + 1), 1e-6)
    # a real test: the policy moved away from the reference by step 2 (a reference that followed the adapters would
    # read 0 there), and before any update it is the reference
    assert abs(base[1]["ppo/kl"]) < 1e-7 and abs(base[2]["ppo/kl"]) > 1e-3
    assert base[2]["ppo/kl_loss"] > 1e-5


def test_chunked_on_policy_equals_whole_logits_and_the_old_logprob_pass(runs):
    base, unchunked = ppo_metrics_by_step(runs["lora_base"]), ppo_metrics_by_step(runs["unchunked"])
    # step 1: the same weights and samples, only fp32 rounding apart (the ratio is 1 exactly on-policy, 1 to ~1e-7
    # from the separate pass); step 2 starts from weights one update apart by that rounding
    assert_same(base, unchunked, [1], 1e-6)
    assert_same(base, unchunked, [2], 1e-5)
    assert base[1]["ppo/ratio"] == 1.0 and base[1]["ppo/approx_kl"] == 0.0
    assert base[1]["ppo/policy_loss"] != 0.0


def test_what_each_run_loaded_and_said(runs):
    assert "reference log-probs from the actor's LoRA base (adapters off)" in log_text(runs["lora_base"])
    assert "old log-probs from the update's own forward" in log_text(runs["lora_base"])
    assert "reference log-probs from a frozen copy" in log_text(runs["separate"])
    assert "old log-probs from a forward pass after each rollout" in log_text(runs["unchunked"])
    with open(os.path.join(runs["lora_base"], "results.json"), encoding="utf-8") as f:
        held = json.load(f)["state_bytes_per_rank"]
    with open(os.path.join(runs["separate"], "results.json"), encoding="utf-8") as f:
        held_separate = json.load(f)["state_bytes_per_rank"]
    assert "reference" not in held and held_separate["reference"] > 0


def test_gradient_checkpointing_takes_effect_on_a_model_loaded_for_ppo(tmp_path_factory):
    """PPO's models come from from_pretrained in eval mode, where transformers skips checkpointing: the option has to
    switch training mode on (dropout is off at load), else the activations of every layer are kept anyway."""
    import torch
    from dist_hybrid_models import tiny_models

    from rlhf_ds.engine.strategy import enable_checkpointing
    from rlhf_ds.models.loading import load_causal_lm

    model = load_causal_lm(tiny_models(tmp_path_factory)["llama"], {}, "fp32", disable_dropout=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))

    def saved_bytes() -> tuple[int, torch.Tensor]:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        return total, loss

    kept, loss = saved_bytes()
    assert not model.training
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert saved_bytes()[0] == kept  # enabled the usual way, in eval mode: no effect
    enable_checkpointing(model)
    checkpointed, again = saved_bytes()
    assert model.training and checkpointed < kept / 2, (checkpointed, kept)
    assert again.item() == loss.item()  # training mode changed nothing else (no dropout)
