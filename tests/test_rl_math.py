"""RL math against the hand-computed numbers in shared/notes/rlhf-math.md (fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ds.rl.math import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    entropy_from_logits,
    gae,
    kl_loss,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(a, b, atol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=atol, rtol=0)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_population_var_ignore_pads():
    x = t([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 1e9, -1e9]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(masked_mean(x, mask), 3.0)
    close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    close(masked_var(x, mask), 2.0)  # population: 10 / 5


def test_whiten_without_mean_shift_uses_population_variance():
    x = t([[1.2, 1.3, 1.4], [1.5, 1.6, 1.7], [1.8, 1.9, 2.0]])
    out = masked_whiten(x, torch.ones_like(x), shift_mean=False)
    close(out[0, 0], 0.0508, atol=1e-4)  # 0.1394 would mean the unbiased variance
    close(masked_mean(out, torch.ones_like(x)), 1.6)


@pytest.mark.parametrize("pad", [0.0, 1e6, float("nan")])
def test_masked_whiten_pads_are_zero_and_inert(pad):
    x = t([[1.0, 2.0, 3.0, pad], [4.0, 5.0, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    r = math.sqrt(2.0)
    close(masked_whiten(x, mask), [[-r, -r / 2, 0, 0], [r / 2, r, 0, 0]], atol=1e-6)


# --------------------------------------------------------------------------- log-probs, entropy, KL


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_from_logits_applies_temperature(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=D)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    expected = F.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
    close(logprobs_from_logits(logits, labels, temperature), expected)


def test_logprobs_upcast_half_precision_and_reject_bad_temperature():
    logits = torch.randn(1, 3, 7).to(torch.bfloat16)
    assert logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float32
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long), temperature=0.0)


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 8, dtype=D)
    close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8), dtype=D))
    logits = t([[[0.0, 1.0, 2.0]]])
    p = F.softmax(logits / 0.5, dim=-1)
    close(entropy_from_logits(logits, temperature=0.5), -(p * p.log()).sum(-1))


def test_kl_estimators_hand_values():
    logp, ref = t([0.0, 0.5, -1.0]), t([0.0, 0.0, 0.0])  # d = 0, 0.5, -1
    close(kl_per_token(logp, ref, "k1"), [0.0, 0.5, -1.0])
    close(kl_per_token(logp, ref, "k2"), [0.0, 0.125, 0.5])
    close(kl_per_token(logp, ref, "k3"), [0.0, math.exp(-0.5) - 0.5, math.e - 2.0])
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k4")


def test_actor_equals_reference_gives_zero_kl_unit_ratio_and_no_clipping():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 6, generator=g, dtype=D) * 5
    mask = torch.ones(3, 6, dtype=D)
    mask[1, 4:] = 0
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_per_token(logp, logp.clone(), est), torch.zeros_like(logp))
    adv = torch.randn(3, 6, generator=g, dtype=D)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    close(loss, -masked_mean(adv, mask))

    # First epoch: V == V_old and R = A_raw + V, so the value loss is 0.5 * mean(A_raw^2).
    values = torch.randn(3, 6, generator=g, dtype=D)
    rewards = per_token_rewards(t([1.0, -0.5, 0.2]), kl_per_token(logp, logp, "k1"), mask, beta=0.1)
    a_raw, returns = gae(rewards, values, mask)
    vloss, vclip = value_loss(values, values.clone(), returns, mask, clip_range=0.2)
    close(vloss, 0.5 * masked_mean(a_raw**2, mask))
    assert vclip.item() == 0.0


# --------------------------------------------------------------------------- rewards and GAE


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert last_token_index(right).dtype == torch.long
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_per_token_rewards_hand_example_and_score_clipping():
    kl, mask = t([[0.1, -0.2, 0.3]]), t([[1, 1, 1]])
    close(per_token_rewards(t([1.0]), kl, mask, beta=0.05), [[-0.005, 0.01, 0.985]])
    close(per_token_rewards(t([7.0]), kl, mask, beta=0.05, score_clip=2.0), [[-0.005, 0.01, 2.0 - 0.015]])
    close(per_token_rewards(t([-7.0]), kl, mask, beta=0.05, score_clip=2.0), [[-0.005, 0.01, -2.0 - 0.015]])


def test_per_token_rewards_padded_batch():
    kl = t([[0.1, -0.2, 0.3, float("nan")], [float("nan"), 0.4, 0.2, float("nan")]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 0]])
    out = per_token_rewards(t([1.0, 2.0]), kl, mask, beta=0.05)
    close(out, [[-0.005, 0.01, 0.985, 0.0], [0.0, -0.02, 1.99, 0.0]])


REWARDS = [-0.005, 0.01, 0.985]
VALUES = [0.5, 0.6, 0.7]


@pytest.mark.parametrize(
    "lam, advantages, returns",
    [
        (0.95, [0.4567125, 0.38075, 0.285], [0.9567125, 0.98075, 0.985]),
        (1.0, [0.49, 0.395, 0.285], [0.99, 0.995, 0.985]),
        (0.0, [0.095, 0.11, 0.285], [0.595, 0.71, 0.985]),
    ],
)
def test_gae_hand_example(lam, advantages, returns):
    adv, ret = gae(t([REWARDS]), t([VALUES]), t([[1, 1, 1]]), gamma=1.0, lam=lam)
    close(adv, [advantages])
    close(ret, [returns])


def test_gae_right_padded_batch_rows_are_independent():
    rewards = t([REWARDS + [123.0], [0.3, -0.1, 55.0, float("nan")]])
    values = t([VALUES + [9.0], [0.2, 0.4, -3.0, float("nan")]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv[0], [0.4567125, 0.38075, 0.285, 0.0])
    close(ret[0], [0.9567125, 0.98075, 0.985, 0.0])
    # Row 2 by hand: delta = [0.3 + 0.4 - 0.2, -0.1 - 0.4] = [0.5, -0.5]; A_0 = 0.5 - 0.95 * 0.5.
    close(adv[1], [0.025, -0.5, 0.0, 0.0])
    close(ret[1], [0.225, -0.1, 0.0, 0.0])


def test_gae_left_padding_matches_unpadded():
    adv, ret = gae(t([[0.0] + REWARDS]), t([[4.0] + VALUES]), t([[0, 1, 1, 1]]))
    close(adv, [[0.0, 0.4567125, 0.38075, 0.285]])
    close(ret, [[0.0, 0.9567125, 0.98075, 0.985]])


# --------------------------------------------------------------------------- losses


def test_clipped_surrogate_hand_example():
    adv, rho = t([[1.0, -1.0, 1.0]]), t([[1.5, 0.5, 0.5]])
    old = t([[-1.0, -2.0, -0.5]])
    mask = t([[1, 1, 1]])
    loss, stats = policy_loss(old + rho.log(), old, adv, mask, clip_eps=0.2)
    close(loss, -0.3)  # per-token [-1.2, 0.8, -0.5]
    close(stats["clipfrac"], 2 / 3)
    close(stats["ratio_mean"], 2.5 / 3)
    r = rho.log()
    close(stats["approx_kl"], (rho - 1 - r).mean())


def test_policy_loss_ignores_pads_and_has_gradient():
    logp = t([[-1.0, -2.0, 5.0]]).requires_grad_()
    old = t([[-1.0, -2.0, float("nan")]])
    loss, _ = policy_loss(logp, old, t([[1.0, 2.0, float("nan")]]), t([[1, 1, 0]]))
    loss.backward()
    close(loss, -1.5)
    close(logp.grad, [[-0.5, -1.0, 0.0]])


def test_dual_clip_hand_example():
    # eps 0.2, c 3 (verl: clip_ratio_c). Per token: L = max(-A rho, -A clip(rho, 0.8, 1.2)); with A < 0, min(L, -3A).
    # t0 A -1, rho 400: L = 400 -> 3 (dual-clipped)     t1 A -1, rho 2.5: L = 2.5 < 3 -> 2.5
    # t2 A -2, rho 3.5: L = 7 -> 6 (dual-clipped)        t3 A +1, rho 4: L = max(-4, -1.2) = -1.2 (A > 0: untouched)
    # t4 A -1, rho 0.5: L = max(0.5, 0.8) = 0.8 < 3      t5 pad (A -5, rho e^10): ignored
    adv = t([[-1.0, -1.0, -2.0, 1.0, -1.0, -5.0]])
    rho = t([[400.0, 2.5, 3.5, 4.0, 0.5, math.exp(10.0)]])
    old = t([[-3.0, -2.0, -1.5, -4.0, -0.7, -9.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    logp = (old + rho.log()).requires_grad_()
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    close(loss, (3.0 + 2.5 + 6.0 - 1.2 + 0.8) / 5)  # 2.22
    close(stats["dual_clipfrac"], 2 / 5)  # t0, t2
    close(stats["clipfrac"], 2 / 5)  # t3, t4: unchanged by the dual clip
    loss.backward()
    # only t1 is neither clipped nor dual-clipped: d(-A rho)/d logp = -A rho = 2.5, over 5 tokens
    close(logp.grad, [[0.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    # off (the default): [400, 2.5, 7, -1.2, 0.8] -> 81.82, and no dual_clipfrac figure
    loss, stats = policy_loss(logp.detach(), old, adv, mask, clip_eps=0.2)
    close(loss, (400.0 + 2.5 + 7.0 - 1.2 + 0.8) / 5)
    assert "dual_clipfrac" not in stats


def test_kl_loss_clamps_the_log_ratio_before_the_estimate():
    # d = logp - ref = [-25, 0.5]. Unclamped k3 = e^25 - 26 = 7.2e10 on token 0: loss (token mean) 3.6e10, gradient
    # (1 - e^25) / 2 = -3.6e10. Clamped to [-10, 10] (the default, ppo.kl_loss_log_ratio_clip):
    # k3 = [e^10 - 1 - 10, e^-0.5 - 1 + 0.5] = [22015.465795, 0.106531] -> mean 11007.786163
    logp = t([[-30.0, -1.0, 3.0]]).requires_grad_()
    ref = t([[-5.0, -1.5, float("nan")]])
    mask = t([[1, 1, 0]])
    loss, mean_kl = kl_loss(logp, ref, mask)
    close(loss, (math.exp(10) - 11 + math.exp(-0.5) - 0.5) / 2)
    close(loss, 11007.786163, atol=1e-6)
    close(mean_kl, loss.detach())
    loss.backward()
    close(logp.grad, [[0.0, (1 - math.exp(-0.5)) / 2, 0.0]])  # the clamped token gives no gradient; the other as before
    # null: the old, unbounded value
    loss, _ = kl_loss(logp.detach(), ref, mask, log_ratio_clip=None)
    close(loss / 3.6e10, (math.exp(25) - 26 + math.exp(-0.5) - 0.5) / 2 / 3.6e10)  # 3.6002e10
    # k1 and k2 are clamped the same way: d -> [-10, 0.5]
    close(kl_loss(logp.detach(), ref, mask, "k1")[0], (-10 + 0.5) / 2)
    close(kl_loss(logp.detach(), ref, mask, "k2")[0], (50 + 0.125) / 2)
    # float32, d = -100: e^100 overflowed to inf (loss and gradient); clamped it is e^10 - 11, gradient finite
    logp32 = torch.tensor([[-101.0, -1.0]], requires_grad=True)
    ref32, mask32 = torch.tensor([[-1.0, -1.5]]), torch.ones(1, 2)
    assert torch.isinf(kl_loss(logp32.detach(), ref32, mask32, log_ratio_clip=None)[0])
    loss32, _ = kl_loss(logp32, ref32, mask32)
    torch.testing.assert_close(loss32.double(), torch.tensor((math.exp(10) - 11 + math.exp(-0.5) - 0.5) / 2, dtype=D),
                               rtol=1e-6, atol=0)
    loss32.backward()
    assert torch.isfinite(logp32.grad).all()
    # the reward's KL (kl_per_token, no clip argument) is unchanged: k3 at d = -25 stays e^25 - 26
    close(kl_per_token(t(-30.0), t(-5.0), "k3") / math.exp(25), (math.exp(25) - 26) / math.exp(25))


def test_value_clip_hand_example():
    v, v_old, ret, mask = t([[1.0]]), t([[0.5]]), t([[1.0]]), t([[1]])
    loss, clipfrac = value_loss(v, v_old, ret, mask, clip_range=0.2)
    close(loss, 0.045)
    close(clipfrac, 1.0)
    loss, clipfrac = value_loss(v, v_old, ret, mask, clip_range=None)
    close(loss, 0.0)
    close(clipfrac, 0.0)


def test_bradley_terry_hand_values_and_shift_invariance():
    d = t([0.0, 1.0, 2.0, -1.0])
    per_pair = [bradley_terry_loss(d[i : i + 1], torch.zeros(1, dtype=D)) for i in range(4)]
    close(torch.stack(per_pair), [0.693147, 0.313262, 0.126928, 1.313262], atol=1e-6)
    r_c, r_r = t([0.3, 2.0, -1.0]), t([0.1, 2.5, -3.0])
    close(bradley_terry_loss(r_c + 17.0, r_r + 17.0), bradley_terry_loss(r_c, r_r))
    close(bradley_terry_loss(t([1e4]), t([0.0])), 0.0)
    close(bradley_terry_loss(t([-1e4]), t([0.0])), 1e4)  # logsigmoid stays finite


def test_bradley_terry_margin_and_weights():
    r_c, r_r = t([2.0, 1.0]), t([0.0, 0.0])
    close(bradley_terry_loss(r_c, r_r, margin=t([1.0, 1.0])), (0.313262 + 0.693147) / 2, atol=1e-6)
    close(bradley_terry_loss(r_c, r_r, margin=1.0), bradley_terry_loss(r_c - 1.0, r_r))
    close(bradley_terry_loss(r_c, r_r, weights=t([3.0, 1.0])), (3 * 0.126928 + 0.313262) / 4, atol=1e-6)
    close(bradley_terry_loss(r_c, r_r, weights=t([2.0, 2.0])), bradley_terry_loss(r_c, r_r))


# --------------------------------------------------------------------------- KL controllers


@pytest.mark.parametrize("kl, beta", [(12.0, 0.151536), (3.0, 0.148464), (6.0, 0.15), (6.6, 0.150768), (100.0, 0.151536)])
def test_adaptive_kl_controller(kl, beta):
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    ctl.update(torch.tensor(kl, dtype=D), n_steps=512)  # tensors accepted too
    assert ctl.beta == pytest.approx(beta, abs=1e-12)


def test_kl_controllers_factory_and_state_dict():
    fixed = make_kl_controller("fixed", 0.1)
    assert isinstance(fixed, FixedKLController) and fixed.update(50.0, 512) == 0.1
    ctl = make_kl_controller("adaptive", 0.15, target=6.0, horizon=10000)
    ctl.update(12.0, 512)
    restored = make_kl_controller("adaptive", 0.15, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.beta == ctl.beta
    with pytest.raises(ValueError):
        make_kl_controller("adaptive", 0.15)
    with pytest.raises(ValueError):
        make_kl_controller("pid", 0.15)
