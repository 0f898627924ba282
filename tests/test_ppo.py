"""PPO end to end through the real CLI on 2 CPU ranks, ZeRO-3 for all four engines, sampled rollouts (T=0.7).

Two short runs from the tiny models of `dist_hybrid_models.py` (seconds to build, no CLI pretraining):
  gpt2_actor   GPT-2 actor, LLaMA reward model (another architecture and tokenizer: responses are re-tokenised), EMA on;
               one micro-batch per rollout and ppo_epochs=1, so step 1 must show KL == 0, ratio == 1, clipfrac == 0
  llama_actor  LLaMA actor, GPT-2 reward model (the other direction)
Sampling makes response lengths differ across ranks; each run must finish within its timeout (no hang).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import read_metrics, run_cli
from dist_hybrid_models import tiny_models

STEPS = 2
COMMON = [f"ppo.steps={STEPS}", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1",
          "generation.max_new_tokens=16", "generation.temperature=0.7", "train.log_every=1"]
TIMEOUT = 300  # a rank waiting forever on the other fails the test here


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_actor(models, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ppo") / "gpt2_actor")
    run_cli(["ppo", f"output_dir={out}", f"actor.model={models['gpt2']}", f"reward.model={models['llama_rm']}",
             "ppo.ema_decay=0.5", *COMMON], ranks=2, timeout=TIMEOUT)
    return out


@pytest.fixture(scope="module")
def llama_actor(models, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ppo") / "llama_actor")
    run_cli(["ppo", f"output_dir={out}", f"actor.model={models['llama']}", f"reward.model={models['gpt2_rm']}", *COMMON],
            ranks=2, timeout=TIMEOUT)
    return out


def by_step(run_dir: str) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir) if "ppo/kl" in row}


def weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_first_step_actor_equals_reference(gpt2_actor):
    first = by_step(gpt2_actor)[1]
    assert first["ppo/kl"] == 0.0  # actor == reference: per-token log-probs identical, not just close
    assert first["ppo/non_score_reward"] == 0.0
    assert first["ppo/ratio"] == 1.0  # one micro-batch, first epoch: new == old log-probs exactly
    assert first["ppo/clipfrac"] == 0.0
    assert first["ppo/approx_kl"] == 0.0


def test_actor_moves_after_the_first_update(gpt2_actor):
    second = by_step(gpt2_actor)[2]
    assert second["ppo/kl"] != 0.0  # step 2 samples from the updated actor: it differs from the reference


@pytest.mark.parametrize("run", ["gpt2_actor", "llama_actor"])
def test_reward_model_of_another_architecture_and_tokenizer(run, request, models):
    run_dir = request.getfixturevalue(run)
    steps = by_step(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for row in steps.values():
        for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/gold_reward"):
            assert math.isfinite(row[key]), (key, row[key])
        assert 0 < row["ppo/response_length"] <= 16
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["steps"] == STEPS and math.isfinite(results["reward_mean"])
    actor = "gpt2" if run == "gpt2_actor" else "llama"
    with open(os.path.join(run_dir, "model", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_type"] == ("gpt2" if actor == "gpt2" else "llama")
    # the critic reads the actor's tokens, so it starts from the actor (a backbone with the actor's vocabulary)
    with open(os.path.join(run_dir, "critic", "config.json"), encoding="utf-8") as f:
        critic = json.load(f)
    with open(os.path.join(models[actor], "config.json"), encoding="utf-8") as f:
        assert critic["vocab_size"] == json.load(f)["vocab_size"]


def test_sampled_lengths_are_ragged_and_runs_finish(gpt2_actor, llama_actor):
    # some responses stop at EOS, some run to the limit: lengths differ within and across ranks, and both runs ended
    rows = list(by_step(gpt2_actor).values()) + list(by_step(llama_actor).values())
    assert any(0 < row["ppo/eos_rate"] < 1 for row in rows)
    assert all(row["timing/generation"] > 0 for row in rows)


def test_ema_model_saved_and_differs(gpt2_actor, models):
    ema, final, start = (weights(os.path.join(gpt2_actor, "ema")), weights(os.path.join(gpt2_actor, "model")),
                         weights(models["gpt2"]))
    assert ema.keys() == final.keys()
    changed = [k for k in final if not torch.equal(final[k], start[k])]
    assert changed  # PPO updated the actor
    # EMA(decay 0.5) after 2 updates = 0.25 w0 + 0.25 w1 + 0.5 w2: strictly between start and final weights
    assert all(not torch.equal(ema[k], final[k]) and not torch.equal(ema[k], start[k]) for k in changed)
    for k in changed:
        lo, hi = torch.minimum(start[k], final[k]), torch.maximum(start[k], final[k])
        # w1 can lie outside [w0, w2] elementwise; the EMA stays within their hull widened by the step sizes
        spread = (final[k] - start[k]).abs().max()
        assert ((ema[k] >= lo - spread) & (ema[k] <= hi + spread)).all()


def test_rollout_diversity_and_reward_length_correlation_are_logged(gpt2_actor, llama_actor):
    for run_dir in (gpt2_actor, llama_actor):
        for row in by_step(run_dir).values():
            assert 0 < row["ppo/distinct_fraction"] <= 1 and 0 <= row["ppo/distinct_2"] <= 1
            assert -1 <= row["ppo/reward_length_corr"] <= 1
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
            assert json.load(f)["collapse_warning_steps"] == []  # sampled answers of a fresh policy: no collapse


def test_held_out_prompts_are_evaluated_and_a_collapsed_rollout_is_warned_about(models, tmp_path):
    """Greedy one-token answers: every prompt gets the policy's single most likely first word, a rollout collapsed by
    construction (and with no word bigram at all); each figure's warning fires once, when it has stayed below its
    threshold for `patience` steps. data.eval_split=8 holds 8 prompts out (4 per rank), evaluated at the end and written for `rlhf-ds eval`.
    The reward model says it was trained on templated prompts, and PPO's are not: a warning names both."""
    import shutil

    reward = str(tmp_path / "rm")
    shutil.copytree(models["gpt2_rm"], reward)
    with open(os.path.join(reward, "scalar_head.json"), encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(reward, "scalar_head.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "prompt_templates": ["Question: {question}\n\nAnswer: "]}, f)
    out = str(tmp_path / "collapsed")
    proc = run_cli(["ppo", f"output_dir={out}", f"actor.model={models['gpt2']}", f"reward.model={reward}",
                    *COMMON, "ppo.steps=2", "generation.do_sample=false", "generation.max_new_tokens=1",
                    "ppo.collapse_patience=2", "data.eval_split=8"], ranks=2, timeout=TIMEOUT)
    steps = by_step(out)
    assert all(row["ppo/distinct_fraction"] < 0.3 for row in steps.values()), [r["ppo/distinct_fraction"] for r in steps.values()]
    assert (f"the reward model {reward} was trained on prompts rendered with templates ['Question: {{question}}\\n\\n"
            "Answer: '], but PPO renders its prompts with [None]") in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "the rollouts are collapsing" in line]
    assert len(warnings) == 2 and all("step 2: the rollouts are collapsing: only " in w for w in warnings)
    assert "% of the responses were distinct in each of the last 2 steps (below 0.3)" in warnings[0]
    assert "only 0% of the word bigrams were distinct" in warnings[1]
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["collapse_warning_steps"] == [2]
    assert "ppo/eval_reward" in steps[2] and "ppo/eval_reward" not in steps[1]
    assert math.isfinite(steps[2]["ppo/eval_reward"]) and 0 < steps[2]["ppo/eval_distinct_fraction"] <= 1
    with open(os.path.join(out, "eval_prompts.jsonl"), encoding="utf-8") as f:
        assert len(f.readlines()) == 8
