"""Advantage estimators behind one interface, chosen by name (``ppo.advantage_estimator``).

Each estimator maps an :class:`AdvantageInputs` (sequence scores, per-token KL to the reference,
response mask, prompt groups, optional critic values) to per-token ``(advantages, returns)``,
``[B, T]`` with pads exactly 0. ``gae`` needs a critic; the others replace the critic by a
baseline: the other samples of the same prompt (``grpo``, ``dr_grpo``, ``rloo``,
``reinforce_pp_baseline``) or the whole batch (``reinforce_pp``). The critic-free ones keep the
KL to the reference inside the reward, so ``beta`` keeps its PPO meaning.

Group estimators see only this rank's samples: every sample of a prompt must be on the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from rlhf_ds.registry import Registry
from rlhf_ds.rl import math as rlm

WHITEN_SCOPES = ("rank", "global")


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # [B] sequence reward (the task reward after shaping: rlhf_ds/rl/shaping.py)
    kl: torch.Tensor  # [B, T] per-token KL estimate vs the reference; pads arbitrary
    mask: torch.Tensor  # [B, T] 1 on response tokens, 0 on pads
    group_ids: torch.Tensor  # [B] long: samples of one prompt share an id; groups need not be contiguous
    values: Optional[torch.Tensor]  # [B, T] critic values (gae only)
    beta: float  # KL-in-reward coefficient (current value of the KL controller)


@dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable  # fn(inp: AdvantageInputs, cfg) -> (advantages [B, T], returns [B, T])
    needs_critic: bool
    needs_groups: bool


ESTIMATORS = Registry("advantage estimator")  # name -> Estimator; a plugin adds its own with `register`


def register(name: str, needs_critic: bool = False, needs_groups: bool = False):
    """Decorator adding ``fn(inp, cfg) -> (advantages, returns)`` to :data:`ESTIMATORS` under ``name``; ``cfg`` is the
    ``ppo`` config section."""

    def add(fn):
        ESTIMATORS.register(name, Estimator(name, fn, needs_critic, needs_groups))
        return fn

    return add


def get_estimator(name: str) -> Estimator:
    return ESTIMATORS.get(name)


# --------------------------------------------------------------------------- helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, across_ranks: bool = False, eps: float = 1e-8):
    """:func:`rlm.masked_whiten` with statistics over this rank's tokens or over every rank's.

    ``across_ranks`` all-reduces (sum, sum of squares, count) over the default process group, in
    fp64 so the one-pass variance does not cancel, and gives the population variance of the
    concatenated batch. Without an initialised group of more than one rank it is exactly
    ``rlm.masked_whiten``. Collective: every rank must call it.
    """
    if not (across_ranks and _distributed()):
        return rlm.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    m = rlm._as_bool(mask)
    filled = torch.where(m, x, torch.zeros_like(x)).double()
    stats = torch.stack([filled.sum(), (filled * filled).sum(), m.sum().double()])
    dist.all_reduce(stats)
    total, total_sq, count = stats
    mean = total / count
    var = (total_sq / count - mean * mean).clamp(min=0.0)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def _across(cfg) -> bool:
    if cfg.whiten_scope not in WHITEN_SCOPES:
        raise ValueError(f"unknown whiten_scope {cfg.whiten_scope!r}; expected one of {WHITEN_SCOPES}")
    return cfg.whiten_scope == "global"


def _groups(group_ids: torch.Tensor):
    """(index of each sample's group, samples per group); a baseline from the other samples needs >= 2."""
    ids, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        lone = ids[counts < 2][0].item()
        raise ValueError(f"group advantage estimators need >= 2 samples per prompt; group {lone} has 1 "
                         "(set ppo.n_samples_per_prompt >= 2)")
    return inverse, counts


def _group_sum(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def _group_mean(x: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of each sample's group, one entry per sample."""
    return (_group_sum(x, inverse, len(counts)) / counts.to(x.dtype))[inverse]


def _sequence_reward(inp: AdvantageInputs) -> torch.Tensor:
    """R = score - beta * sum of the KL over the response (KL in the reward, as PPO pays it)."""
    m = rlm._as_bool(inp.mask)
    kl_sum = torch.where(m, inp.kl, torch.zeros_like(inp.kl)).sum(1)
    return inp.scores.to(kl_sum.dtype) - inp.beta * kl_sum


def _spread(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its sequence's advantage; pads 0."""
    m = rlm._as_bool(mask)
    return torch.where(m, a[:, None].expand(m.shape), torch.zeros((), dtype=a.dtype, device=a.device))


def _constant_groups(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups] bool: every value of the group is bitwise the same (max == min)."""
    hi = torch.full((n_groups,), float("-inf"), dtype=x.dtype, device=x.device)
    lo = torch.full((n_groups,), float("inf"), dtype=x.dtype, device=x.device)
    return hi.scatter_reduce(0, inverse, x, reduce="amax") == lo.scatter_reduce(0, inverse, x, reduce="amin")


def _zero_in_constant_groups(a: torch.Tensor, x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``a`` with exact zeros for the samples of groups whose ``x`` are all equal (bitwise).

    A group mean rounds: six float32 copies of 7.3 sum to 43.799999 and their mean lies one ulp below
    7.3, so x - mean is +4.8e-7 on every sample, and GRPO's division by (std + eps), std 5.2e-7, turns
    that into +0.313 for all six (a third or more of such groups at n = 8 for random values; verl and OpenRLHF
    compute the same). Such a group teaches nothing (``zero_signal_groups`` counts it), so it gets 0.
    A select, not a different formula: every other group keeps its arithmetic, and so its bits.
    """
    return torch.where(_constant_groups(x, inverse, n_groups)[inverse], torch.zeros_like(a), a)


def _centre(x: torch.Tensor, baseline: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """x - baseline (a group baseline), exactly 0 in groups whose x are all equal."""
    return _zero_in_constant_groups(x - baseline, x, inverse, n_groups)


def constant_groups(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[groups] bool, in the order of the sorted group ids: every sample of the group has bitwise the same x."""
    ids, inverse = torch.unique(group_ids.to(x.device), return_inverse=True)
    return _constant_groups(x, inverse, len(ids))


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor, shaped: Optional[torch.Tensor] = None) -> dict:
    """``zero_signal_groups``: share of prompts whose samples all scored the same.

    Such a group has zero advantage under every group baseline, so it spends compute and teaches
    nothing; a high share means the task is too easy or too hard for the current policy. With
    ``shaped`` (the scores after penalties) also ``penalty_only_groups``: the share whose task
    scores are all equal but whose shaped scores are not -- their update comes from the penalties alone.
    """
    constant = constant_groups(scores, group_ids)
    stats = {"zero_signal_groups": constant.float().mean().item()}
    if shaped is not None:
        stats["penalty_only_groups"] = (constant & ~constant_groups(shaped, group_ids)).float().mean().item()
    return stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - var(returns - values) / var(returns) over real tokens: 1 is a perfect critic, 0 no better than a constant.

    nan when the returns do not vary.
    """
    var_returns = rlm.masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1.0 - rlm.masked_var(returns - values, mask) / var_returns).item()


# --------------------------------------------------------------------------- estimators


@register("gae", needs_critic=True)
def gae_estimator(inp: AdvantageInputs, cfg):
    """PPO: dense rewards (-beta * KL per token, score on the last), GAE against the critic."""
    if inp.values is None:
        raise ValueError("the gae advantage estimator needs critic values")
    across = _across(cfg)
    rewards = rlm.per_token_rewards(inp.scores, inp.kl, inp.mask, inp.beta)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, inp.mask, shift_mean=False, across_ranks=across)
    advantages, returns = rlm.gae(rewards, inp.values, inp.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, inp.mask, across_ranks=across)
    return advantages, returns


@register("grpo", needs_groups=True)
def grpo_estimator(inp: AdvantageInputs, cfg):
    """GRPO: (R - group mean) / (group std + eps), std unbiased (n-1) as in OpenRLHF and most GRPO code; 0 for a
    group whose R are all equal (not its mean's rounding error over (that error's std + eps))."""
    inverse, counts = _groups(inp.group_ids)
    reward = _sequence_reward(inp)
    centred = reward - _group_mean(reward, inverse, counts)
    var = _group_sum(centred * centred, inverse, len(counts)) / (counts - 1).to(reward.dtype)
    a = _zero_in_constant_groups(centred / (var.sqrt()[inverse] + cfg.group_std_eps), reward, inverse, len(counts))
    a = _spread(a, inp.mask)
    return a, a


@register("dr_grpo", needs_groups=True)
def dr_grpo_estimator(inp: AdvantageInputs, cfg):
    """Dr. GRPO: R - group mean; dividing by the std up-weights prompts that are nearly solved or nearly hopeless."""
    inverse, counts = _groups(inp.group_ids)
    reward = _sequence_reward(inp)
    a = _spread(_centre(reward, _group_mean(reward, inverse, counts), inverse, len(counts)), inp.mask)
    return a, a


@register("rloo", needs_groups=True)
def rloo_estimator(inp: AdvantageInputs, cfg):
    """RLOO: R_i - mean of the other n-1 samples of the prompt (a baseline independent of the sample itself)."""
    inverse, counts = _groups(inp.group_ids)
    reward = _sequence_reward(inp)
    others = (_group_sum(reward, inverse, len(counts))[inverse] - reward) / (counts[inverse] - 1).to(reward.dtype)
    a = _spread(_centre(reward, others, inverse, len(counts)), inp.mask)
    return a, a


def _reinforce_pp(scores: torch.Tensor, inp: AdvantageInputs, cfg):
    """Discounted returns of the PPO per-token rewards (GAE with V = 0 and lambda = 1), whitened over the batch."""
    rewards = rlm.per_token_rewards(scores, inp.kl, inp.mask, inp.beta)
    returns, _ = rlm.gae(rewards, torch.zeros_like(rewards), inp.mask, cfg.gamma, 1.0)
    return whiten(returns, inp.mask, across_ranks=_across(cfg)), returns


@register("reinforce_pp")
def reinforce_pp_estimator(inp: AdvantageInputs, cfg):
    """REINFORCE++: the batch normalisation of the returns is the only baseline."""
    return _reinforce_pp(inp.scores, inp, cfg)


@register("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_baseline_estimator(inp: AdvantageInputs, cfg):
    """REINFORCE++ with the prompt's mean score subtracted first, so easy and hard prompts start level."""
    inverse, counts = _groups(inp.group_ids)
    scores = inp.scores.to(inp.kl.dtype)
    return _reinforce_pp(_centre(scores, _group_mean(scores, inverse, counts), inverse, len(counts)), inp, cfg)
