"""Advantage estimators (rlhf_ds/rl/advantages.py) and the loss options of rlhf_ds/rl/math.py against hand-computed
numbers (shared/notes/rlhf-math.md, "Critic-free estimators"), fp64 unless said otherwise. Cross-rank whitening runs on
2 gloo processes (no DeepSpeed)."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_ds.rl import math as rlm
from rlhf_ds.rl.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    explained_variance,
    get_estimator,
    group_stats,
    register,
    whiten,
)

D = torch.float64
NAN = float("nan")


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=atol, rtol=0)


def cfg(**kw):
    base = dict(gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=False, whiten_scope="rank",
                group_std_eps=1e-6)
    base.update(kw)
    return SimpleNamespace(**base)


def run(name, inp, c=None):
    return get_estimator(name).fn(inp, c or cfg())


# --------------------------------------------------------------------------- registry


def test_registry_names_flags_and_errors():
    assert set(ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert [n for n, e in ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert {n for n, e in ESTIMATORS.items() if e.needs_groups} == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    assert get_estimator("rloo").name == "rloo"
    with pytest.raises(ValueError, match="'ppo'.*grpo"):
        get_estimator("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register("gae")(lambda inp, c: None)


# --------------------------------------------------------------------------- group estimators on one batch of 8

# Two prompts, samples interleaved: group 7 scores [1, 0, 0, 1] (rows 0, 2, 5, 6), group 3 scores [2, 2, 2, 2].
GROUPS = torch.tensor([7, 3, 7, 3, 3, 7, 7, 3])
SCORES = t([1.0, 2.0, 0.0, 2.0, 2.0, 0.0, 1.0, 2.0])
LENGTHS = [4, 1, 2, 3, 4, 2, 3, 1]
MASK = t([[1.0 if j < n else 0.0 for j in range(4)] for n in LENGTHS])
# +1 for a reward-1 sample of group 7, -1 for a reward-0 one, 0 in group 3
SIGN = t([1.0, 0.0, -1.0, 0.0, 0.0, -1.0, 1.0, 0.0])


def batch8():
    kl = torch.where(MASK.bool(), torch.zeros_like(MASK), torch.full_like(MASK, NAN))  # KL 0 on real tokens, nan pads
    return AdvantageInputs(SCORES, kl, MASK, GROUPS, None, beta=0.1)


@pytest.mark.parametrize("name, magnitude", [
    # group mean 0.5; unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.577350 -> 0.5 / (0.577350 + 1e-6) = 0.866024
    ("grpo", 0.5 / (math.sqrt(1 / 3) + 1e-6)),
    ("dr_grpo", 0.5),  # 1 - 0.5, 0 - 0.5
    ("rloo", 2 / 3),  # 1 - mean(0, 0, 1) = 2/3, 0 - mean(1, 0, 1) = -2/3
])
def test_group_estimators_hand_values_on_interleaved_groups(name, magnitude):
    adv, ret = run(name, batch8())
    expected = (SIGN * magnitude)[:, None] * MASK  # every real token gets the sample's advantage; group [2,2,2,2] -> 0
    close(adv, expected, atol=1e-12)
    assert torch.equal(ret, adv)
    assert not torch.isnan(adv).any()
    assert (adv[MASK == 0] == 0).all()


def test_grpo_uses_unbiased_std():
    adv, _ = run("grpo", batch8())
    close(adv[0, 0], 0.866025, atol=1e-5)  # 1.0 would mean the population std


def test_outcome_reward_includes_kl_sum_and_ignores_kl_pads():
    # R = score - beta * sum_t kl: [1 - 0.1 * (0.5 + 0.5), 0 - 0.1 * 3] = [0.9, -0.3]; mean 0.3 -> dr_grpo [0.6, -0.6]
    kl = t([[0.5, 0.5, NAN], [1.0, 2.0, 1e9]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    inp = AdvantageInputs(t([1.0, 0.0]), kl, mask, torch.tensor([5, 5]), None, beta=0.1)
    adv, _ = run("dr_grpo", inp)
    close(adv, [[0.6, 0.6, 0.0], [-0.6, -0.6, 0.0]], atol=1e-12)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_of_one_is_rejected(name):
    inp = AdvantageInputs(t([1.0, 0.0, 1.0]), torch.zeros(3, 2, dtype=D), torch.ones(3, 2, dtype=D),
                          torch.tensor([0, 0, 4]), None, beta=0.0)
    with pytest.raises(ValueError, match="group 4 has 1"):
        run(name, inp)


def test_zero_signal_groups():
    assert group_stats(SCORES, GROUPS) == {"zero_signal_groups": 0.5}  # group 3 is all 2s, group 7 is not
    assert group_stats(t([1.0, 1.0, 0.0, 0.5]), torch.tensor([0, 0, 1, 1]))["zero_signal_groups"] == 0.5


# --------------------------------------------------------------------------- constant groups in float32 (#22)

F32 = torch.float32


def constant_batch(values_and_sizes, width=3, dtype=F32):
    """One group per (value, n): n samples that all scored `value`, KL 0, beta 0."""
    scores = torch.cat([torch.full((n,), v, dtype=dtype) for v, n in values_and_sizes])
    groups = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(values_and_sizes)])
    b = len(scores)
    return AdvantageInputs(scores, torch.zeros(b, width, dtype=dtype), torch.ones(b, width, dtype=dtype), groups, None,
                           beta=0.0)


@pytest.mark.parametrize("name, n", [("grpo", 6), ("grpo", 8), ("dr_grpo", 6), ("rloo", 8)])
def test_constant_group_gives_exact_zero_advantages_in_float32(name, n):
    # n float32 copies of 7.3 (7.30000019): their float32 mean is one ulp lower (7.29999971), so R - mean = +4.77e-7 on
    # every sample. Before the fix: grpo 4.77e-7 / (std 5.22e-7 + 1e-6) = +0.3132 on all six (+0.3158 at n = 8),
    # dr_grpo +4.77e-7, rloo (n = 8) +4.77e-7; while zero_signal_groups called the group signal-free.
    inp = constant_batch([(7.3, n)])
    assert (inp.scores.sum() / n).item() != inp.scores[0].item()  # the rounding this is about
    adv, ret = run(name, inp)
    assert torch.equal(adv, torch.zeros(n, 3, dtype=F32))  # exactly 0, not 1e-7 and not 0.3
    assert torch.equal(ret, adv)
    assert group_stats(inp.scores, inp.group_ids) == {"zero_signal_groups": 1.0}


def test_reinforce_pp_baseline_constant_groups_centre_to_exact_zero():
    # Two constant groups, KL 0: score - group mean must be exactly 0, so returns are 0 and so is everything whitened.
    # Before the fix the returns were the means' rounding errors (+4.77e-7 for 7.3, -7.45e-9 for 0.1) and batch whitening
    # (var 5.9e-14 << eps 1e-8) blew them up to advantages of +-0.00242.
    inp = constant_batch([(7.3, 8), (0.1, 8)])
    adv, ret = run("reinforce_pp_baseline", inp)
    assert torch.equal(ret, torch.zeros(16, 3, dtype=F32))
    assert torch.equal(adv, torch.zeros(16, 3, dtype=F32))


def old_group_formula(name, reward, group_ids, eps=1e-6):
    """The group formulas as they were before the constant-group fix, op for op (index_add_ group sums)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=reward.dtype).index_add_(0, inverse, reward)
    centred = reward - (sums / counts.to(reward.dtype))[inverse]
    if name == "dr_grpo":
        return centred
    if name == "grpo":
        sq = torch.zeros(len(counts), dtype=reward.dtype).index_add_(0, inverse, centred * centred)
        return centred / ((sq / (counts - 1).to(reward.dtype)).sqrt()[inverse] + eps)
    return reward - (sums[inverse] - reward) / (counts[inverse] - 1).to(reward.dtype)  # rloo


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_constant_group_is_zero_and_the_other_group_keeps_its_bits(name):
    # float32, interleaved: group 2 has six identical samples (score 7.1, the same KL row -> R = 7.08 bit for bit, whose
    # group mean and leave-one-out means are one ulp off: R - mean = -4.77e-7),
    # group 5 six random ones of different lengths; beta 0.05, so R = score - 0.05 * sum of the KL.
    g = torch.Generator().manual_seed(4)
    groups = torch.tensor([2, 5] * 6)
    scores = torch.where(groups == 2, torch.tensor(7.1), 3 * torch.randn(12, generator=g))
    kl = torch.where((groups == 2)[:, None], torch.tensor([0.3, -0.1, 0.2]), torch.randn(12, 3, generator=g))
    mask = torch.ones(12, 3)
    mask[[1, 5, 9], 2] = 0
    kl[[1, 5, 9], 2] = NAN
    inp = AdvantageInputs(scores, kl, mask, groups, None, beta=0.05)
    reward = scores - 0.05 * torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(1)
    old = old_group_formula(name, reward, groups)
    assert (old[groups == 2] != 0).all()  # what it was: the group mean's rounding error (grpo: over its std + eps)
    adv, _ = run(name, inp)
    assert torch.equal(adv[groups == 2], torch.zeros(6, 3))
    other = groups == 5
    assert torch.equal(adv[other], torch.where(mask[other].bool(), old[other][:, None], torch.tensor(0.0)))
    assert group_stats(scores, groups) == {"zero_signal_groups": 0.5}


# --------------------------------------------------------------------------- REINFORCE++

# Row 0: kl [1, 0, 0], score 1; row 1: kl [0, 2, pad], score 0; beta 0.1, gamma 1.
RPP_KL = t([[1.0, 0.0, 0.0], [0.0, 2.0, NAN]])
RPP_MASK = t([[1, 1, 1], [1, 1, 0]])


def test_reinforce_pp_hand_example():
    inp = AdvantageInputs(t([1.0, 0.0]), RPP_KL, RPP_MASK, torch.tensor([0, 1]), None, beta=0.1)
    adv, ret = run("reinforce_pp", inp)
    # rewards [-0.1, 0, 1] and [0, -0.2]; returns (reverse cumsum) [0.9, 1, 1] and [-0.2, -0.2]
    close(ret, [[0.9, 1.0, 1.0], [-0.2, -0.2, 0.0]], atol=1e-12)
    # mean 2.5 / 5 = 0.5; deviations [0.4, 0.5, 0.5, -0.7, -0.7]; population var (0.16+0.25+0.25+0.49+0.49)/5 = 0.328
    s = math.sqrt(0.328 + 1e-8)
    close(adv, [[0.4 / s, 0.5 / s, 0.5 / s], [-0.7 / s, -0.7 / s, 0.0]], atol=1e-9)
    close(adv[0, 0], 0.698430, atol=1e-6)

    # gamma 0.5: row 0 G_2 = 1, G_1 = 0 + 0.5 * 1 = 0.5, G_0 = -0.1 + 0.5 * 0.5 = 0.15; row 1 G_1 = -0.2, G_0 = -0.1
    _, ret = run("reinforce_pp", inp, cfg(gamma=0.5))
    close(ret, [[0.15, 0.5, 1.0], [-0.1, -0.2, 0.0]], atol=1e-12)


def test_reinforce_pp_baseline_subtracts_group_mean_first():
    inp = AdvantageInputs(t([1.0, 0.0]), RPP_KL, RPP_MASK, torch.tensor([3, 3]), None, beta=0.1)
    adv, ret = run("reinforce_pp_baseline", inp)
    # scores - mean 0.5 = [0.5, -0.5]; rewards [-0.1, 0, 0.5] and [0, -0.7]; returns [0.4, 0.5, 0.5] and [-0.7, -0.7]
    close(ret, [[0.4, 0.5, 0.5], [-0.7, -0.7, 0.0]], atol=1e-12)
    # mean 0, var (0.16+0.25+0.25+0.49+0.49)/5 = 0.328
    s = math.sqrt(0.328 + 1e-8)
    close(adv, [[0.4 / s, 0.5 / s, 0.5 / s], [-0.7 / s, -0.7 / s, 0.0]], atol=1e-9)


# --------------------------------------------------------------------------- GAE


def test_gae_estimator_hand_example():
    # notes: beta 0.05, kl [0.1, -0.2, 0.3], score 1 -> rewards [-0.005, 0.01, 0.985]; values [0.5, 0.6, 0.7]
    inp = AdvantageInputs(t([1.0]), t([[0.1, -0.2, 0.3, NAN]]), t([[1, 1, 1, 0]]), torch.tensor([0]),
                          t([[0.5, 0.6, 0.7, NAN]]), beta=0.05)
    adv, ret = run("gae", inp)
    close(adv, [[0.4567125, 0.38075, 0.285, 0.0]])
    close(ret, [[0.9567125, 0.98075, 0.985, 0.0]])
    with pytest.raises(ValueError, match="critic values"):
        run("gae", AdvantageInputs(inp.scores, inp.kl, inp.mask, inp.group_ids, None, beta=0.05))


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("whiten_advantages", [False, True])
def test_gae_estimator_is_bit_identical_to_the_experience_maker(whiten_rewards, whiten_advantages):
    g = torch.Generator().manual_seed(3)
    old_logp = -torch.rand(5, 7, generator=g) * 4  # float32, like the rollout
    ref_logp = -torch.rand(5, 7, generator=g) * 4
    raw_values = torch.randn(5, 7, generator=g)
    scores = torch.randn(5, generator=g)
    m = torch.ones(5, 7)
    for row, n in enumerate([7, 3, 5, 1, 6]):
        m[row, n:] = 0
    beta, gamma, lam = 0.07, 0.99, 0.9

    # today's ExperienceMaker.make()
    kl = rlm.kl_per_token(old_logp, ref_logp, "k3") * m
    rewards = rlm.per_token_rewards(scores, kl, m, beta)
    if whiten_rewards:
        rewards = rlm.masked_whiten(rewards, m, shift_mean=False)
    values = raw_values * m
    want_adv, want_ret = rlm.gae(rewards, values, m, gamma, lam)
    if whiten_advantages:
        want_adv = rlm.masked_whiten(want_adv, m)

    c = cfg(gamma=gamma, lam=lam, whiten_rewards=whiten_rewards, whiten_advantages=whiten_advantages)
    for kl_in, values_in in [(kl, values), (rlm.kl_per_token(old_logp, ref_logp, "k3"), raw_values)]:  # masked or not
        for scope in ("rank", "global"):  # no process group: global is the same as rank
            c.whiten_scope = scope
            adv, ret = run("gae", AdvantageInputs(scores, kl_in, m, torch.arange(5), values_in, beta), c)
            assert torch.equal(adv, want_adv) and torch.equal(ret, want_ret)


def test_unknown_whiten_scope_is_rejected():
    inp = AdvantageInputs(t([1.0, 0.0]), RPP_KL, RPP_MASK, torch.tensor([0, 1]), None, beta=0.1)
    with pytest.raises(ValueError, match="whiten_scope"):
        run("reinforce_pp", inp, cfg(whiten_scope="world"))


# --------------------------------------------------------------------------- explained variance


def test_explained_variance_hand_example():
    # returns [1, 2, 3]: var 2/3; residual [0, 0, 1]: mean 1/3, var (1/9 + 1/9 + 4/9) / 3 = 2/9; 1 - (2/9)/(2/3) = 2/3
    mask = t([[1, 1, 1, 0]])
    ev = explained_variance(t([[1.0, 2.0, 2.0, NAN]]), t([[1.0, 2.0, 3.0, NAN]]), mask)
    assert ev == pytest.approx(2 / 3, abs=1e-12)
    assert explained_variance(t([[1.0, 2.0, 3.0, 0.0]]), t([[1.0, 2.0, 3.0, 5.0]]), mask) == 1.0
    assert math.isnan(explained_variance(t([[0.0, 1.0, 2.0, 0.0]]), t([[1.0, 1.0, 1.0, 0.0]]), mask))


# --------------------------------------------------------------------------- loss aggregation, clipping, KL loss

# Row 0: [1, 2, 3]; row 1: [4, pad, pad] (nan pads must not leak).
LOSS = t([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
LOSS_MASK = t([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("mode, norm_length, expected", [
    ("token-mean", None, 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
    ("seq-mean-token-sum", None, 5.0),  # (6 + 4) / 2 rows
    ("seq-mean-token-mean", None, 3.0),  # (6/3 + 4/1) / 2
    ("seq-mean-token-sum-norm", 5, 1.0),  # 10 / (2 rows * 5)
])
def test_aggregate_loss_modes(mode, norm_length, expected):
    assert mode in rlm.LOSS_AGG_MODES
    x = LOSS.clone().requires_grad_()
    out = rlm.aggregate_loss(x, LOSS_MASK, mode, norm_length)
    close(out, expected)
    out.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[LOSS_MASK == 0] == 0).all()


def test_aggregate_loss_errors():
    with pytest.raises(ValueError, match="norm_length"):
        rlm.aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        rlm.aggregate_loss(LOSS, LOSS_MASK, "sum")


def test_asymmetric_clip_hand_example():
    adv, rho = t([[1.0, -1.0, 1.0]]), t([[1.5, 0.5, 1.25]])
    old = t([[-1.0, -2.0, -0.5]])
    mask = t([[1, 1, 1]])
    logp = old + rho.log()
    # clip to [0.8, 1.28]: per-token max(-A rho, -A clip(rho)) = [max(-1.5, -1.28), max(0.5, 0.8), max(-1.25, -1.25)]
    # = [-1.28, 0.8, -1.25]; mean -1.73 / 3; clipped strictly larger on tokens 0 and 1
    loss, stats = rlm.policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(loss, -1.73 / 3)
    close(stats["clipfrac"], 2 / 3)
    # symmetric 0.2 clips token 2 as well: [-1.2, 0.8, -1.2] -> -1.6 / 3, clipfrac 1
    loss, stats = rlm.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(loss, -1.6 / 3)
    close(stats["clipfrac"], 1.0)


def test_policy_loss_defaults_unchanged_and_agg_changes_loss_only():
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 5, generator=g, dtype=D) * 3
    logp = old + 0.3 * torch.randn(3, 5, generator=g, dtype=D)
    adv = torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.ones(3, 5, dtype=D)
    mask[1, 2:] = 0
    base, base_stats = rlm.policy_loss(logp, old, adv, mask, 0.2)
    same, _ = rlm.policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.2, agg="token-mean")
    assert torch.equal(base, same)
    seq, seq_stats = rlm.policy_loss(logp, old, adv, mask, 0.2, agg="seq-mean-token-sum")
    ratio = (logp - old).exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    close(seq, (per_token * mask).sum(1).mean())
    assert not torch.isclose(seq, base)
    for k in base_stats:
        assert torch.equal(seq_stats[k], base_stats[k])


def test_kl_loss_k3_hand_value_and_gradient():
    logp = t([[-1.0, -2.0, 7.0]]).requires_grad_()
    ref = t([[-1.5, -1.0, NAN]])
    mask = t([[1, 1, 0]])
    loss, mean_kl = rlm.kl_loss(logp, ref, mask)
    # d = logp - ref = [0.5, -1]; k3 = e^-d - 1 + d = [e^-0.5 - 0.5, e - 2] = [0.106531, 0.718282]; mean 0.412406
    k3 = [math.exp(-0.5) - 0.5, math.e - 2.0]
    close(loss, sum(k3) / 2)
    close(loss, 0.412406, atol=1e-6)
    close(mean_kl, sum(k3) / 2)
    assert not mean_kl.requires_grad
    loss.backward()
    # d k3 / d logp = 1 - e^-d, halved by the token mean: [(1 - e^-0.5) / 2, (1 - e) / 2, 0]
    close(logp.grad, [[(1 - math.exp(-0.5)) / 2, (1 - math.e) / 2, 0.0]])
    # k1 summed per sequence: 0.5 - 1 = -0.5
    loss, _ = rlm.kl_loss(logp.detach(), ref, mask, "k1", agg="seq-mean-token-sum")
    close(loss, -0.5)


# --------------------------------------------------------------------------- whitening across ranks


def test_whiten_without_process_group_is_masked_whiten():
    x, m = t([[1.0, 2.0, 3.0, NAN], [4.0, 5.0, NAN, NAN]]), t([[1, 1, 1, 0], [1, 1, 0, 0]])
    for shift in (True, False):
        assert torch.equal(whiten(x, m, shift, across_ranks=True), rlm.masked_whiten(x, m, shift))


def _rank_slices():
    """Two ranks' batches with different row counts and padding; nan pads."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 6, generator=g) * 3 + 1  # float32, as in training
    kl = torch.rand(5, 6, generator=g) * 0.2
    m = torch.ones(5, 6)
    for row, n in enumerate([6, 2, 4, 1, 5]):
        m[row, n:] = 0
    x, kl = x.masked_fill(m == 0, NAN), kl.masked_fill(m == 0, NAN)
    scores = torch.randn(5, generator=g)
    return [(x[:3], kl[:3], m[:3], scores[:3]), (x[3:], kl[3:], m[3:], scores[3:])], (x, kl, m, scores)


def _whiten_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, kl, m, scores = _rank_slices()[0][rank]
        inp = AdvantageInputs(scores, kl, m, torch.arange(len(scores)), None, beta=0.1)
        out = {
            "shift": whiten(x, m, shift_mean=True, across_ranks=True),
            "scale": whiten(x, m, shift_mean=False, across_ranks=True),
            "rank_scope": whiten(x, m, across_ranks=False),
            "rpp": get_estimator("reinforce_pp").fn(inp, cfg(whiten_scope="global"))[0],
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whiten_across_two_ranks_equals_whitening_the_concatenation(tmp_path):
    mp.spawn(_whiten_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    slices, (x, kl, m, scores) = _rank_slices()
    for key, shift in [("shift", True), ("scale", False)]:
        joined = torch.cat([got[0][key], got[1][key]])
        torch.testing.assert_close(joined, rlm.masked_whiten(x, m, shift), atol=1e-6, rtol=0)
        assert (joined[m == 0] == 0).all()
    for r in range(2):  # rank scope stays local, and differs from the global statistics
        assert torch.equal(got[r]["rank_scope"], rlm.masked_whiten(slices[r][0], slices[r][2]))
    assert not torch.allclose(got[0]["rank_scope"], got[0]["shift"])
    # the estimator's global scope reaches the same statistics as one rank holding the whole batch
    whole = AdvantageInputs(scores, kl, m, torch.arange(5), None, beta=0.1)
    joined = torch.cat([got[0]["rpp"], got[1]["rpp"]])
    torch.testing.assert_close(joined, run("reinforce_pp", whole)[0], atol=1e-6, rtol=0)
