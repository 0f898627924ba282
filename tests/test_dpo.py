"""`rlhf-ds dpo` end to end through the real CLI (tiny GPT-2 from `tiny_base`, built-in preference pairs):

* ZeRO-3 on 2 CPU ranks (policy and reference) against ZeRO-0 on one rank: the same per-step figures;
* precomputed reference log-probs give the same losses as a live ZeRO-3 reference engine (1e-6), and the cached
  log-probs (computed in padded batches under ZeRO-3 on 2 ranks) equal each sequence scored alone by plain
  transformers: the sequence log-probs are padding- and batch-invariant; the cache is reused, keyed by its fingerprint;
* LoRA with the reference = the policy's base with adapters off (no second copy), plus the SFT term;
* SimPO (no reference); resume from a checkpoint reproduces the uninterrupted run exactly;
* a bad preference row stops the step with file, row and field named and exit status 2, before any output.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from conftest import read_metrics, run_cli

STEPS = 5
SMALL = ["data.max_seq_len=48", "data.max_prompt_tokens=24", "train.micro_batch_size=4", "train.log_every=1",
         "train.eval_batch_size=100", "engine.lr=1e-3", "checkpoint.every_minutes=0"]
ALGO = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")


def results(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def per_step(run_dir: str) -> dict[int, dict]:
    """The algorithm's figures per training step (wall-clock throughput excluded)."""
    return {r["step"]: {k: r[f"dpo/{k}"] for k in ALGO} for r in read_metrics(run_dir) if "dpo/loss" in r}


def assert_close(a: dict, b: dict, rel: float) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for k in a[step]:
            if k == "reward_accuracy" and max(abs(a[step]["reward_margin"]), abs(b[step]["reward_margin"])) < 1e-6:
                # every pair a tie (step 1: policy == reference): "chosen > rejected" then counts 1e-7 roundings of
                # the log-probs, which differ with the batch shape (a precomputed reference's margins read 9.5e-8
                # where the live one's read exactly 0); the margins, losses and later steps are still compared
                continue
            assert a[step][k] == pytest.approx(b[step][k], rel=rel, abs=rel), f"step {step} {k}: {a[step][k]} vs {b[step][k]}"


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpo")
    common = ["dpo", f"model={tiny_base}", f"train.max_steps={STEPS}", *SMALL]
    out = {name: str(root / name) for name in ("live_z3", "pre_z3", "pre_z0", "live_z0")}
    # log-probs from hidden states (engine.logit_chunk_tokens' default) on 2 ranks ZeRO-3, whole logits on 1 rank ZeRO-0
    run_cli([*common, f"output_dir={out['live_z3']}", "train.grad_accum=1"], ranks=2)
    run_cli([*common, f"output_dir={out['live_z0']}", "train.grad_accum=2", "engine.zero_stage=0",
             "reference.engine.zero_stage=0", "engine.logit_chunk_tokens=0", "reference.engine.logit_chunk_tokens=0"],
            ranks=1)
    run_cli([*common, f"output_dir={out['pre_z3']}", "train.grad_accum=1", "dpo.precompute_reference=true"], ranks=2)
    run_cli([*common, f"output_dir={out['pre_z0']}", "train.grad_accum=2", "dpo.precompute_reference=true",
             "engine.zero_stage=0", "reference.engine.zero_stage=0"], ranks=1)
    return out


def test_precomputed_reference_equals_live_reference(runs):
    live, pre = per_step(runs["live_z3"]), per_step(runs["pre_z3"])
    assert sorted(live) == list(range(1, STEPS + 1))
    # same policy, same batches; only where the reference log-probs come from differs (a padded pass before training
    # vs the live engine on each micro-batch): agreement to fp32 rounding of the log-probs
    assert_close(live, pre, rel=1e-6)
    assert len({round(v["loss"], 5) for v in live.values()}) == STEPS  # the runs train
    r_live, r_pre = results(runs["live_z3"]), results(runs["pre_z3"])
    assert (r_live["reference"], r_pre["reference"]) == ("engine", "precomputed")
    for k in ("eval_loss_start", "eval_loss", "eval_reward_margin", "eval_logp_chosen"):
        assert r_live[k] == pytest.approx(r_pre[k], rel=1e-6, abs=1e-6), k
    # before any update the policy is the reference: loss ln 2, implicit rewards 0
    assert r_live["eval_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(r_live["eval_reward_margin_start"]) < 1e-6
    assert r_live["eval_loss"] < r_live["eval_loss_start"]  # lr 1e-3 for 5 steps: the held-out loss moves down


def test_zero3_two_ranks_matches_zero0_one_rank(runs):
    # live references: policy and reference score the same micro-batches, so at step 1 every margin is an exact tie
    # in both runs. A precomputed reference scores other batch shapes, whose 1e-7 rounding depends on the CPU's
    # kernels (an AVX2-only machine: z3 ties, z0 margins of 1e-7) and flips tied pairs' reward_accuracy (0 vs 0.125)
    z3, z0 = per_step(runs["live_z3"]), per_step(runs["live_z0"])
    assert_close(z3, z0, rel=1e-5)  # only reduction orders differ (see tests/test_sft.py)
    r3, r0 = results(runs["pre_z3"]), results(runs["pre_z0"])
    assert r3["eval_loss"] == pytest.approx(r0["eval_loss"], rel=1e-5)
    assert r3["eval_reward_accuracy"] == pytest.approx(r0["eval_reward_accuracy"], abs=2e-3)


def test_cached_reference_logps_equal_each_sequence_alone(runs, tiny_base):
    """The cache of the 2-rank ZeRO-3 run: every chosen/rejected log-prob equals the sequence scored alone (batch of
    one, no padding) by plain transformers from the reference folder."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rlhf_ds.data.features import preference_features
    from rlhf_ds.data.formats import load_preferences
    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.rl.math import logprobs_from_logits
    from rlhf_ds.rl.preference import sequence_logps

    path = os.path.join(runs["pre_z3"], "reference_logps.safetensors")
    with safe_open(path, framework="pt") as f:
        assert len(f.metadata()["fingerprint"]) == 64
        table = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(os.path.join(runs["pre_z0"], "reference_logps.safetensors"), framework="pt") as f:
        other = {k: f.get_tensor(k) for k in f.keys()}
    assert table.keys() == other.keys() == {"train", "eval"}
    for k in table:  # 2 ranks ZeRO-3 vs 1 rank ZeRO-0, different batch compositions
        assert torch.allclose(table[k], other[k], rtol=0, atol=1e-4)

    tok = load_tokenizer(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_base, "model")).eval()
    examples, _ = load_preferences(os.path.join(runs["pre_z3"], "data", "pref_eval.jsonl"))
    feats, _ = preference_features(examples[:40], tok, 24, 48)
    assert table["eval"].shape[1] == 1000 and len(feats) == 40
    for i, f in enumerate(feats):
        for row, ids in enumerate((f["chosen_ids"], f["rejected_ids"])):
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x).logits
            alone, n = sequence_logps(logprobs_from_logits(logits[:, :-1], x[:, 1:]), x, torch.ones_like(x),
                                      torch.tensor([f["prompt_len"]]))
            assert n.item() == len(ids) - f["prompt_len"]
            assert table["eval"][row, i].item() == pytest.approx(alone.item(), abs=1e-4 + 1e-6 * abs(alone.item()))


def test_lora_reference_is_the_base_with_adapters_off(tiny_base, tmp_path):
    out = str(tmp_path / "lora")
    run_cli(["dpo", f"model={tiny_base}", f"output_dir={out}", "train.max_steps=3", *SMALL, "engine.lora.enabled=true",
             "engine.lora.rank=4", "engine.lr=1e-2", "dpo.sft_coef=0.5"], ranks=2)
    res = results(out)
    assert res["reference"] == "adapters_off" and res["trainable_params"] == 2 * 4 * 1024  # adapters only
    rows = {r["step"]: r for r in read_metrics(out) if "dpo/loss" in r}
    # step 1: LoRA B starts at 0, so the policy is exactly its base (the reference): preference loss ln 2, rewards 0,
    # and the logged loss is ln 2 + 0.5 * the chosen NLL per token
    assert rows[1]["dpo/reward_margin"] == 0.0 and rows[1]["dpo/reward_chosen"] == 0.0
    assert rows[1]["dpo/loss"] == pytest.approx(math.log(2) + 0.5 * rows[1]["dpo/sft_loss"], rel=1e-6)
    assert rows[3]["dpo/reward_margin"] != 0.0  # the adapters moved the policy away from its base
    assert os.path.isfile(os.path.join(out, "model", "adapter", "adapter_config.json"))


def test_resume_reproduces_the_uninterrupted_run_and_reuses_the_cache(tiny_base, tmp_path):
    common = ["dpo", f"model={tiny_base}", "train.max_steps=6", *SMALL, "engine.zero_stage=0",
              "reference.engine.zero_stage=0", "dpo.precompute_reference=true", "checkpoint.every_steps=3"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run_cli([*common, f"output_dir={full}"])
    step3 = os.path.join(str(tmp_path), "ckpt3")
    shutil.copytree(os.path.join(full, "checkpoints", "step_00000003"), step3)
    cache = os.path.join(full, "reference_logps.safetensors")
    proc = run_cli([*common, f"output_dir={resumed}", f"checkpoint.resume={step3}", f"dpo.reference_cache={cache}"])
    assert "fingerprint matches" in proc.stderr  # the reference is not loaded again
    assert "restored checkpoint" in proc.stderr
    assert per_step(resumed) == per_step(full)  # exactly: every input is restored bit for bit
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_simpo_needs_no_reference(tiny_base, tmp_path):
    out = str(tmp_path / "simpo")
    proc = run_cli(["dpo", f"model={tiny_base}", f"output_dir={out}", "train.max_steps=3", *SMALL,
                    "engine.zero_stage=0", "dpo.loss=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=0.5"])
    res = results(out)
    assert res["reference"] == "none" and "reference log-probs: none" in proc.stderr
    # implicit rewards are beta x the average log-prob: negative, and unequal from the first step (no reference)
    assert res["eval_reward_chosen_start"] < 0 and res["eval_reward_margin_start"] != 0
    assert math.isfinite(res["eval_loss"]) and res["steps"] == 3


def test_bad_rows_are_refused_before_any_output(tiny_base, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "human : hi . assistant :", "chosen": "hello .", "rejected": "no ."},
            {"prompt": "human : hi . assistant :", "chosen": "hello .", "rejected": 7}]  # row 2 (rows count from 1)
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "bad")
    proc = run_cli(["dpo", f"model={tiny_base}", f"output_dir={out}", f"data.train={bad}", *SMALL], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("rlhf-ds dpo: ")][-1]
    assert str(bad) in line and "row 2" in line and "'rejected'" in line, line
    assert not os.path.exists(os.path.join(out, "config.yaml")) and not os.path.exists(os.path.join(out, "model"))


# ---- the pipeline's DPO branch (planning and report; no training) -------------------------------------------------
def test_pipeline_plans_the_dpo_branch(tmp_path):
    from rlhf_ds.config import ConfigError, load_config
    from rlhf_ds.steps import pipeline

    run = str(tmp_path / "run")

    def plan(*overrides):
        return {p.name: p for p in pipeline.plan(load_config("pipeline", None, [f"output_dir={run}", *overrides]))}

    assert list(plan()) == ["pretrain", "sft", "rm", "ppo", "eval"]  # the default is the PPO branch, as before
    dpo = plan("algorithm=dpo")
    assert list(dpo) == ["pretrain", "sft", "dpo", "eval"]
    assert dpo["dpo"].inputs == {"model": f"{run}/sft"} and dpo["dpo"].ranks == 2
    assert dpo["eval"].inputs == {"sft": f"{run}/sft", "dpo": f"{run}/dpo"}  # no PPO policy, no reward model
    both = plan("algorithm=both", "dpo.dpo.beta=0.2")
    assert list(both) == ["pretrain", "sft", "rm", "ppo", "dpo", "eval"]
    assert both["dpo"].cfg.model == both["ppo"].cfg.actor.model == f"{run}/sft"  # both branches from the same SFT
    assert both["dpo"].cfg.dpo.beta == 0.2
    assert both["eval"].inputs == {"sft": f"{run}/sft", "ppo": f"{run}/ppo", "dpo": f"{run}/dpo", "reward": f"{run}/rm"}
    given = plan("algorithm=dpo", "reward_model=/models/rm", "only=dpo,eval", f"sft_model={tmp_path}")
    assert given["eval"].cfg.reward_model == "/models/rm"  # a given RM still scores the DPO branch
    with pytest.raises(ConfigError, match="step 'ppo' is not part of algorithm=dpo"):
        plan("algorithm=dpo", "only=ppo")


def test_report_shows_the_policies_side_by_side(tmp_path):
    from rlhf_ds.tracking import report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "dpo").mkdir()
    (run / "pipeline.json").write_text(json.dumps({"algorithm": "both", "steps": {}}))
    (run / "dpo" / "results.json").write_text(json.dumps({"eval_reward_accuracy": 0.64}))
    rows = [{"step_name": "dpo", "step": s, "time": 0.0, "dpo/loss": 0.7 - s / 100, "dpo/reward_chosen": -s / 50,
             "dpo/reward_rejected": -s / 25, "dpo/logp_chosen": -18 - s / 10, "dpo/logp_rejected": -18 - s / 5}
            for s in range(1, 6)]
    (run / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "results.json").write_text(json.dumps({
        "gold_reward": {"sft": 0.16, "ppo": 0.83, "dpo": 0.44}, "win_rate_ppo_vs_sft": 0.78, "win_rate_dpo_vs_sft": 0.63,
        "win_rate_dpo_vs_ppo": 0.3, "rm_score": {"sft": -0.3, "ppo": 1.2, "dpo": 0.56},
        "response_length": {"sft": 13.3, "ppo": 14.3, "dpo": 14.3}, "eos_rate": {"sft": 1.0, "ppo": 1.0, "dpo": 1.0}}))
    summary = report.write_report(str(run))
    assert list(summary["steps"]) == ["pretrain", "sft", "rm", "ppo", "dpo", "eval"]
    assert summary["dpo"] == {"eval_reward_accuracy": 0.64}
    assert os.path.isfile(run / "plots" / "dpo_rewards.png")
    page = (run / "report.html").read_text()
    table = page[page.index("Policies side by side"):page.index("Responses before and after")]
    for cell in ("<td>SFT</td>", "<td>PPO</td>", "<td>DPO</td>", "+0.440", "63.0%", "30.0%", "+0.560", "14.3"):
        assert cell in table, cell
    assert "Win rate DPO vs SFT" in page
