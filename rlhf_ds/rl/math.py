"""RL math for PPO-style RLHF as small, pure torch functions.

Conventions: per-token tensors are ``[batch, T]``; ``mask`` (float or bool) is 1 on
real response tokens and 0 on padding. Every function selects with the mask instead of
multiplying by it, so whatever sits in padded positions (even inf/nan) never leaks into
results. Nothing here knows about models or DeepSpeed, which keeps it unit-testable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _fill_pads(x: torch.Tensor, mask: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """Replace padded entries by ``value`` (select, not multiply, so nan/inf pads vanish)."""
    return torch.where(_as_bool(mask), x, torch.full_like(x, value))


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the real tokens only (over ``dim``, or over everything when ``dim`` is None)."""
    m = _as_bool(mask)
    filled = _fill_pads(x, m)
    total = filled.sum() if dim is None else filled.sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over the real tokens (divides by n, not n-1, to match the notes)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale to unit variance over real tokens; pads come out 0.

    With ``shift_mean=False`` the original mean is added back, so only the scale changes
    (used for rewards, where shifting the mean would change what the policy is paid for).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _fill_pads(out, mask)


# --------------------------------------------------------------------------- log-probs and KL


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Half-precision log_softmax over a large vocabulary loses the small differences PPO
    # ratios depend on, so the math runs in at least fp32.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of ``labels`` under softmax(logits / temperature).

    The temperature must equal the sampling temperature for every model that scores a
    rollout; otherwise KL and ratios are wrong from the first step.
    """
    logp = F.log_softmax(_scaled_logits(logits, temperature), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy of softmax(logits / temperature), in nats."""
    z = _scaled_logits(logits, temperature)
    return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)


class _ChunkedProjectionLogprobs(torch.autograd.Function):
    """Log-probs of `ids` (and entropies) under softmax((hidden @ weight.T + bias) / temperature), `chunk` rows of
    `hidden` at a time; backward recomputes each chunk's logits, so no `[rows, vocabulary]` tensor outlives its chunk.

    With z the scaled logits and p = softmax(z): d logp / dz = onehot(id) - p, d entropy / dz = -p * (z - E_p[z]).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, chunk):
        logp, entropy = hidden.new_empty(ids.shape, dtype=torch.float32), hidden.new_empty(ids.shape, dtype=torch.float32)
        for i in range(0, ids.shape[0], chunk):
            z, p = _chunk_softmax(hidden[i : i + chunk], weight, bias, temperature)
            # entropy = -sum p log p = logsumexp(z) - E_p[z]; log p(id) = z_id - logsumexp(z)
            lse = torch.logsumexp(z, dim=-1)
            logp[i : i + chunk] = z.gather(-1, ids[i : i + chunk, None])[:, 0] - lse
            entropy[i : i + chunk] = lse - torch.linalg.vecdot(p, z)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids = ctx.saved_tensors
        # a frozen output layer (LoRA) needs no [vocabulary, hidden] gradient: neither its memory nor its matmul
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        d_hidden = torch.zeros_like(hidden) if want_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        for i in range(0, ids.shape[0], ctx.chunk):
            h, rows = hidden[i : i + ctx.chunk], slice(i, i + ctx.chunk)
            z, p = _chunk_softmax(h, weight, bias, ctx.temperature)
            # d_z = -p * (g_logp + g_entropy * (z - E_p[z])) + onehot(id) * g_logp, built in z's storage
            d_z = z.sub_(torch.linalg.vecdot(p, z)[:, None]).mul_(grad_entropy[rows, None])
            d_z.add_(grad_logp[rows, None]).mul_(p).neg_()
            del p
            d_z.scatter_add_(-1, ids[rows, None], grad_logp[rows, None])
            d_logits = d_z.div_(ctx.temperature).to(weight.dtype)
            if d_hidden is not None:
                d_hidden[rows] = d_logits @ weight
            if d_weight is not None and weight.dtype == torch.float32:
                d_weight.addmm_(d_logits.t(), h)
            elif d_weight is not None:  # as autograd's half-precision matmul gives it, summed over chunks in fp32
                d_weight += (d_logits.t() @ h).float()
            if d_bias is not None:
                d_bias += d_logits.float().sum(0)
        return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None, None)


def _chunk_softmax(hidden, weight, bias, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fp32 logits / temperature, their softmax) of a chunk of hidden states, with no other full-width copy."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.linear(hidden, weight, bias)
    z = z.float() if z.dtype != torch.float32 else z
    if temperature != 1.0:
        z.div_(temperature)
    return z, torch.softmax(z, dim=-1)


def chunked_projection_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias, ids: torch.Tensor,
                                temperature: float = 1.0, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each `ids[n]`, entropy) under softmax of the logits `hidden[n] @ weight.T (+ bias)` divided by
    `temperature`, in fp32, for `[N, H]` hidden states; the `[N, vocabulary]` logits exist `chunk` rows at a time, in
    forward and backward. Equals `logprobs_from_logits` / `entropy_from_logits` of the whole logits."""
    return _ChunkedProjectionLogprobs.apply(hidden, weight, bias, ids, temperature, chunk)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1",
                 log_ratio_clip=None) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    With d = logp - ref_logp: k1 = d (unbiased, noisy, can be negative), k2 = d^2/2
    (biased, low variance), k3 = exp(-d) - 1 + d (unbiased, low variance, always >= 0).
    ``log_ratio_clip`` (None: none) clamps d to [-clip, clip] first: k3 grows as exp(-d), 7.2e10 at
    d = -25 and inf in float32 below about -88; a clamped token has no gradient through d.
    """
    d = logp - ref_logp
    if log_ratio_clip is not None:
        d = d.clamp(-log_ratio_clip, log_ratio_clip)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


# --------------------------------------------------------------------------- rewards and advantages


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row; works for left and right padding."""
    m = _as_bool(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    idx = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=-1).values
    if (idx < 0).any():
        raise ValueError("every row of the mask needs at least one real token")
    return idx


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, score_clip=None) -> torch.Tensor:
    """Dense rewards: -beta * KL on every real token, plus the sequence score on the last one.

    ``score_clip`` bounds the reward-model score to [-score_clip, score_clip] so one
    outlier sequence cannot dominate a batch.
    """
    rewards = _fill_pads(-beta * kl, mask)
    score = score.to(rewards.dtype)
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the real tokens of each row.

    delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next, where
    "next" is the next real token of the row (0 after the last one). Pads are skipped, so
    rows of different lengths share a batch; pads get advantage and return 0.
    Returns ``(advantages, returns)`` with returns = advantages + values.
    """
    m = _as_bool(mask)
    rewards, values = _fill_pads(rewards, m), _fill_pads(values, m)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        real = m[:, t]
        advantages[:, t] = torch.where(real, adv, torch.zeros_like(adv))
        next_value = torch.where(real, values[:, t], next_value)
        next_adv = torch.where(real, adv, next_adv)
    returns = _fill_pads(advantages + values, m)
    return advantages, returns


# --------------------------------------------------------------------------- losses


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, norm_length=None) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar; the mode decides how much each token weighs.

    - ``token-mean``: sum / number of real tokens (every token equal; long responses weigh more);
    - ``seq-mean-token-sum``: mean over rows of each row's token sum;
    - ``seq-mean-token-mean``: mean over rows of each row's token mean (every response equal, GRPO paper);
    - ``seq-mean-token-sum-norm``: sum / (B * norm_length) with a constant ``norm_length`` (the generation
      budget), Dr. GRPO: no per-response length normalisation, so no bias towards long wrong answers.
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    m = _as_bool(mask)
    filled = _fill_pads(loss_mat, m)
    if mode == "seq-mean-token-sum":
        return filled.sum(1).mean()
    if mode == "seq-mean-token-mean":
        # a row without real tokens contributes 0 instead of 0/0
        return (filled.sum(1) / m.sum(1).clamp(min=1).to(filled.dtype)).mean()
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError(f"loss aggregation {mode!r} needs a positive norm_length (the generation budget), "
                             f"got {norm_length!r}")
        return filled.sum() / (filled.shape[0] * norm_length)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {LOSS_AGG_MODES}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, clip_eps_high=None, agg: str = "token-mean", norm_length=None, dual_clip=None):
    """PPO clipped surrogate: agg(max(-A * rho, -A * clip(rho, 1-eps_low, 1+eps_high))).

    ``clip_eps`` is the low side; ``clip_eps_high`` (None: same as ``clip_eps``) lets the ratio of
    tokens with positive advantage grow further, so rare good tokens are not clipped as early
    (DAPO's clip-higher). ``agg`` is an :func:`aggregate_loss` mode.

    ``dual_clip`` (c > 1, None: off; Ye et al. 2020, verl's ``clip_ratio_c``, on there at 3): on tokens
    with A < 0 the clipped surrogate above is bounded by -c * A, i.e. min(max(...), -c * A), so a token
    whose ratio has grown far past 1 + eps cannot push the loss (and its gradient) without bound; such a
    token gives no gradient. Tokens with A >= 0 are unchanged.

    Stats (detached 0-dim tensors, token means whatever ``agg`` is):
    - ``clipfrac``: share of real tokens where the clipped term is strictly the larger one,
      i.e. the token gives no gradient because of clipping;
    - ``dual_clipfrac`` (only with ``dual_clip``): share of real tokens with A < 0 whose clipped surrogate
      is strictly above -c * A, i.e. bounded by the dual clip (verl's ``pg_clipfrac_lower``);
    - ``approx_kl``: masked mean of the k3 estimate of KL(old || new) from samples of the
      old policy, exp(r) - 1 - r with r = logp - old_logp (unbiased and >= 0);
    - ``ratio_mean``: masked mean of rho.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = _fill_pads(logp - old_logp, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = advantages < 0
        dual_clipped = negative & (per_token > bound)
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
    loss = aggregate_loss(per_token, mask, agg, norm_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(kl_per_token(old_logp, logp, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(dual_clipped.to(ratio.dtype), mask)
    return loss, stats


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3",
            agg: str = "token-mean", norm_length=None, log_ratio_clip=10.0):
    """KL(policy || reference) as a loss term (GRPO) instead of a penalty inside the reward.

    k3 is the usual choice: unbiased, >= 0, and its gradient pulls towards the reference on
    every token. ``log_ratio_clip`` (``ppo.kl_loss_log_ratio_clip``, None: off) clamps each token's
    logp - ref_logp to [-clip, clip] before the estimate, so one token the policy has all but ruled out
    cannot make the loss inf: k3 is at most e^10 - 11 = 22015.5 per token at 10, and the clamped token
    gives no gradient. Returns ``(loss, mean per-token KL)``, the second detached, a token mean.
    """
    # pads are filled before the exp: a nan pad would otherwise turn its zero gradient into nan
    kl = kl_per_token(_fill_pads(logp, mask), _fill_pads(ref_logp, mask), estimator, log_ratio_clip)
    loss = aggregate_loss(kl, mask, agg, norm_length)
    with torch.no_grad():
        mean_kl = masked_mean(kl, mask)
    return loss, mean_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range=0.2):
    """Critic loss 0.5 * masked_mean((V - R)^2), pessimistically clipped around V_old.

    Clipping keeps the critic from moving further than ``clip_range`` per rollout; it does
    not always help, so ``clip_range=None`` turns it off. Returns ``(loss, clipfrac)``
    where clipfrac is the share of real tokens whose clipped error is the larger one.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    v_clipped = torch.maximum(torch.minimum(values, old_values + clip_range), old_values - clip_range)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clipfrac


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin=None, weights=None) -> torch.Tensor:
    """Reward-model pairwise loss: weighted mean of -log sigmoid(r_c - r_r - margin).

    Depends only on the reward difference, so it cannot pin the reward's offset;
    normalise the trained model separately. ``weights`` are normalised by their sum.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return weighted_mean(-F.logsigmoid(diff), weights)


def weighted_mean(values: torch.Tensor, weights=None) -> torch.Tensor:
    """Mean of per-example `values`, weighted (weights normalised by their sum) when `weights` is given."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum()


# --------------------------------------------------------------------------- KL coefficient controllers


class FixedKLController:
    """Constant KL coefficient (DeepSpeed-Chat style)."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. proportional controller that steers the measured KL towards ``target``.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon), with
    n_steps the number of episodes in the update. The clip limits how fast beta can move.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL controller needs target > 0 and horizon > 0")
        super().__init__(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


def make_kl_controller(kind: str, beta: float, target=None, horizon=None) -> FixedKLController:
    """Build a controller from config: ``kind`` is "fixed" or "adaptive"."""
    if kind == "fixed":
        return FixedKLController(beta)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs target and horizon")
        return AdaptiveKLController(beta, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")
