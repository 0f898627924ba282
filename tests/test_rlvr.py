"""Verifiable-reward RL (#26): score shaping defaults, figures on the task reward, dynamic sampling.

Pure parts against hand-computed numbers (overlong shaping, the auto missing-EOS penalty, penalty-only groups, the
selection and merging of groups, the extra-prompt stream); then real GRPO runs through the CLI: dynamic sampling on a
rollout whose groups all carry signal is the plain step, figure for figure; a task reward without variance warns; bad
settings exit 2. Groups dropped and re-sampled on 2 ranks, with a SIGTERM-interrupted run resuming bit-identically:
tests/test_multi_turn.py (the same run with multi-turn episodes).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import ppo_metrics_by_step, read_metrics, run_cli
from dist_hybrid_models import tiny_models

from rlhf_ds import cli
from rlhf_ds.config import PPOAlgoConfig
from rlhf_ds.rl.advantages import group_stats
from rlhf_ds.rl.dynamic_sampling import PromptStream, Scored, fill_with_signal
from rlhf_ds.rl.shaping import ScoreShaping, default_missing_eos_penalty, overlong_penalty
from rlhf_ds.rollout.base import RolloutBatch, concat_batches
from rlhf_ds.steps.ppo import no_signal_due

t = torch.tensor
PAD = 0


# ---- shaping ------------------------------------------------------------------------------------------------------
def test_overlong_penalty_is_dapos_linear_ramp():
    # 10 new tokens, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    got = overlong_penalty(t([3, 6, 7, 8, 10]), max_new_tokens=10, buffer=4, factor=1.0)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(t([9]), 10, 4, 0.5).tolist() == [-0.375]
    assert overlong_penalty(t([10]), 10, 0, 1.0).tolist() == [0.0]  # off


def test_auto_missing_eos_penalty_follows_the_reward_sources():
    assert default_missing_eos_penalty(["model"], 0) == -1.0  # InstructGPT / DeepSpeed-Chat: the pipeline's
    for sources in (["function"], ["remote"], ["model", "function"], ["model", "remote"]):
        assert default_missing_eos_penalty(sources, 0) is None, sources
    assert default_missing_eos_penalty(["model"], 4) is None  # overlong shaping replaces it
    assert PPOAlgoConfig().missing_eos_penalty == "auto"


def test_shaping_adds_clip_penalty_and_overlong_terms():
    p = PPOAlgoConfig(score_clip=2.0, missing_eos_penalty="auto", overlong_buffer=4, overlong_penalty_factor=1.0)
    shaping = ScoreShaping.from_config(p, ["function"], max_new_tokens=10)
    assert shaping.missing_eos_penalty is None
    task, has_eos, lengths = t([3.0, -5.0, 1.0]), t([True, True, False]), t([5, 8, 10])
    # 3 clipped to 2; -5 clipped to -2, 8 tokens -> -0.5; 10 tokens without EOS -> overlong -1 only
    assert shaping(task, has_eos, lengths).tolist() == [2.0, -2.5, 0.0]
    rm = ScoreShaping.from_config(PPOAlgoConfig(), ["model"], max_new_tokens=10)
    assert rm(t([0.5, 0.5]), t([True, False]), t([3, 10])).tolist() == [0.5, -0.5]
    assert "missing-EOS penalty -1.0" in rm.describe() and "no missing-EOS penalty" in shaping.describe()


def test_penalty_only_groups_count_groups_whose_difference_is_the_penalty():
    groups = t([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    task = t([0.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    shaped = t([0.0, -1, 0, 0, 1, 0, -1, 0, 0, 0, 0, 0])  # group 0: the penalty alone; group 2: no difference at all
    stats = group_stats(task, groups, shaped)
    assert stats == {"zero_signal_groups": pytest.approx(2 / 3), "penalty_only_groups": pytest.approx(1 / 3)}


def test_no_signal_warning_is_due_once_after_patience_steps():
    p = PPOAlgoConfig(n_samples_per_prompt=4, no_signal_patience=3)
    rows = [{"ppo/zero_signal_groups": z} for z in (0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 1.0)]
    assert [no_signal_due(rows[: i + 1], p) for i in range(len(rows))] == [False, False, False, True, False, False,
                                                                          False]
    single = PPOAlgoConfig(no_signal_patience=2)
    rows = [{"ppo/task_reward_std": s} for s in (0.0, 0.0, 0.1)]
    assert [no_signal_due(rows[: i + 1], single) for i in range(3)] == [False, True, False]


# ---- dynamic sampling: selection and merging ---------------------------------------------------------------------
def batch(prompt_len: int, rewards: list[float], group_of: list[int], width: int, tag: int) -> Scored:
    """A fake rollout: sample i has prompt tokens 100*tag + i (left-padded by one column) and `width` response
    tokens 10*tag + i."""
    B = len(rewards)
    seq = torch.cat([torch.full((B, prompt_len), 100 * tag).add(torch.arange(B)[:, None]),
                     torch.full((B, width), 10 * tag).add(torch.arange(B)[:, None])], dim=1)
    seq[:, 0] = PAD
    attn = torch.ones_like(seq)
    attn[:, 0] = 0
    action = torch.cat([torch.zeros(B, prompt_len, dtype=torch.long), torch.ones(B, width, dtype=torch.long)], 1)
    b = RolloutBatch(seq, attn, action, prompt_len, t(group_of), torch.ones(B, dtype=torch.bool),
                     [f"p{tag}.{i}" for i in range(B)], [f"r{tag}.{i}" for i in range(B)], [{}] * B, 1.0)
    return Scored(b, t(rewards), {"function": t(rewards)})


def test_all_groups_with_signal_return_the_first_rollout_itself():
    first = batch(3, [1.0, 0.0, 0.0, 1.0], [4, 4, 5, 5], 2, 1)
    got, stats = fill_with_signal(first, lambda: pytest.fail("no extra round needed"), 2, 3, PAD)
    assert got is first
    assert stats == {"gen_tokens": 8.0, "ds_extra_rounds": 0.0, "ds_prompts_sampled": 2.0, "ds_filled_groups": 0.0,
                     "ds_task_reward_sampled": 0.5, "ds_zero_signal_sampled": 0.0}


def test_groups_without_signal_are_replaced_by_later_rounds_then_filled_at_the_cap():
    first = batch(3, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [4, 4, 5, 5, 6, 6], 2, 1)  # group 5 has signal
    rounds = iter([batch(5, [0.0, 0.0, 1.0, 0.0, 1.0, 1.0], [4, 4, 5, 5, 6, 6], 3, 2),  # group 5 has signal
                   batch(3, [0.0] * 6, [4, 4, 5, 5, 6, 6], 1, 3)])  # none
    got, stats = fill_with_signal(first, lambda: next(rounds), 3, 2, PAD)
    # wanted 3 groups; found 2 with signal after 2 extra rounds (the cap) -> the first spare group of round 0 fills
    # decoded: 6 x 2 + 6 x 3 + 6 x 1 response tokens
    assert stats == {"gen_tokens": 36.0, "ds_extra_rounds": 2.0, "ds_prompts_sampled": 9.0, "ds_filled_groups": 1.0,
                     "ds_task_reward_sampled": pytest.approx(6 / 18), "ds_zero_signal_sampled": pytest.approx(7 / 9)}
    b = got.batch
    # first round's groups 4 (spare, filled) and 5 (signal), then round 2's group 5; ids renumbered from 4
    assert b.prompts == ["p1.0", "p1.1", "p1.2", "p1.3", "p2.2", "p2.3"]
    assert b.group_ids.tolist() == [4, 4, 5, 5, 6, 6]
    assert got.task_reward.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert got.components["function"].tolist() == got.task_reward.tolist()
    # prompts left-padded to 5 columns, responses right-padded to 3; padding is masked out
    assert b.prompt_len == 5 and b.sequences.shape == (6, 8)
    assert b.sequences[0].tolist() == [PAD, PAD, PAD, 100, 100, 10, 10, PAD]
    assert b.attention_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert b.action_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
    assert b.sequences[4].tolist() == [PAD, 202, 202, 202, 202, 22, 22, 22]
    assert b.response_mask[4].tolist() == [1, 1, 1]
    assert b.seconds == 3.0  # every round's decoding


def test_concat_keeps_each_sample_unchanged_under_its_padding():
    a, b = batch(2, [0.0], [0], 4, 1).batch, batch(4, [0.0], [1], 1, 2).batch
    both = concat_batches([a, b], PAD)
    for row, one in ((0, a), (1, b)):
        keep = both.attention_mask[row].bool()
        assert both.sequences[row][keep].tolist() == one.sequences[0][one.attention_mask[0].bool()].tolist()
        assert both.sequences[row][both.action_mask[row].bool()].tolist() == \
            one.sequences[0][one.action_mask[0].bool()].tolist()


def test_prompt_stream_is_seeded_per_rank_and_resumes_where_it_stopped():
    items = [([i], f"p{i}", {}) for i in range(5)]
    a = PromptStream(items, seed=3, rank=0)
    ids, texts, rows = a.take(3)
    assert len(ids) == len(texts) == len(rows) == 3 and sorted(texts) == sorted(set(texts))
    rest = a.take(4)[1]  # across the end of a pass: a new permutation
    assert sorted(texts + rest[:2]) == [f"p{i}" for i in range(5)]
    b = PromptStream(items, seed=3, rank=0)
    b.load_state_dict(PromptStream(items, 3, 0).state_dict() | {"taken": 3})
    assert b.take(4)[1] == rest
    assert PromptStream(items, seed=3, rank=1).take(5)[1] != PromptStream(items, seed=3, rank=0).take(5)[1]


# ---- real runs -------------------------------------------------------------------------------------------------------
REWARDS = '''
import itertools

_next = itertools.count()


def distinct(prompts, responses, **columns):
    """A different score for every response: every group has signal."""
    return [float(next(_next)) for _ in responses]


def parity(prompts, responses, **columns):
    """1 for an even number of characters: about one group in eight has no signal (n = 4)."""
    return [float(len(r) % 2 == 0) for r in responses]


def zero(prompts, responses, **columns):
    return [0.0 for _ in responses]
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def rewards(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rlvr") / "rewards.py"
    path.write_text(REWARDS)
    return str(path)


def grpo(models: dict, out: str, reward: str, *extra: str) -> list[str]:
    return ["ppo", f"output_dir={out}", f"actor.model={models['gpt2']}", "reward.model=null",
            f"reward.function={reward}", "ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=4",
            "ppo.rollout_batch_size=4", "ppo.micro_batch_size=8", "ppo.steps=3", "generation.max_new_tokens=10",
            "data.max_seq_len=64", "train.log_every=1", "checkpoint.every_minutes=0", *extra]


def test_dynamic_sampling_with_signal_in_every_group_is_the_plain_step(models, rewards, tmp_path):
    plain, dynamic = str(tmp_path / "plain"), str(tmp_path / "dynamic")
    run_cli(grpo(models, plain, f"{rewards}:distinct"))
    proc = run_cli(grpo(models, dynamic, f"{rewards}:distinct", "ppo.dynamic_sampling=true"))
    assert "dynamic sampling: up to 4 extra rounds of 4 prompts per rank" in proc.stdout + proc.stderr
    a, b = ppo_metrics_by_step(plain), ppo_metrics_by_step(dynamic)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        ds = {k: v for k, v in b[step].items() if k.startswith("ppo/ds_")}
        assert ds["ppo/ds_extra_rounds"] == 0 and ds["ppo/ds_filled_groups"] == 0 and ds["ppo/ds_prompts_sampled"] == 4
        assert {k: v for k, v in b[step].items() if k not in ds} == a[step], step  # every figure, exactly
        assert a[step]["ppo/zero_signal_groups"] == 0.0 and a[step]["ppo/task_reward"] == a[step]["ppo/reward"]


def test_a_task_reward_without_variance_warns_that_only_the_penalty_teaches(models, rewards, tmp_path):
    out = str(tmp_path / "run")
    proc = run_cli(grpo(models, out, f"{rewards}:zero", "ppo.missing_eos_penalty=-1", "ppo.no_signal_patience=2"))
    log = proc.stdout + proc.stderr
    assert "score shaping: missing-EOS penalty -1.0" in log
    assert "step 2: the task reward (the reward sources before penalties and KL) has not varied within any group" in log
    rows = read_metrics(out)
    assert all(r["ppo/zero_signal_groups"] == 1.0 and r["ppo/task_reward"] == 0.0 for r in rows if "ppo/kl" in r)
    # the penalty made some groups differ: they are counted, on the task reward they carry nothing
    assert max(r["ppo/penalty_only_groups"] for r in rows if "ppo/kl" in r) > 0


@pytest.mark.parametrize("extra, message", [
    (["ppo.dynamic_sampling=true", "ppo.dynamic_sampling_max_rounds=0"],
     "ppo.dynamic_sampling_max_rounds is 0: a cap of extra sampling rounds must be >= 1"),
    (["ppo.dynamic_sampling=true", "ppo.advantage_estimator=reinforce_pp"],
     "ppo.dynamic_sampling drops groups of equal rewards, but ppo.advantage_estimator=reinforce_pp has no groups"),
    (["ppo.dynamic_sampling=true", "hybrid.keep_copy=false"], "hybrid.keep_copy=true"),
    (["ppo.overlong_buffer=10"], "ppo.overlong_buffer (10) must be in 0..generation.max_new_tokens - 1 (9)"),
])
def test_bad_rlvr_settings_exit_2_naming_the_key(models, rewards, tmp_path, capsys, extra, message):
    out = str(tmp_path / "run")
    assert cli.main(["ppo", "--num-gpus", "2", *grpo(models, out, f"{rewards}:zero", *extra)[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ds ppo: config error: ") and message in err, err
    assert not os.path.exists(out)
