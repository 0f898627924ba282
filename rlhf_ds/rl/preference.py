"""Offline preference optimisation (DPO and relatives) as small, pure torch functions.

Inputs are per-pair sequence log-probs of the response tokens: `policy_chosen`, `policy_rejected` from the model being
trained, `ref_chosen`, `ref_rejected` from the frozen reference. Each loss returns `(losses, chosen_rewards,
rejected_rewards)`, one value per pair; the rewards are the implicit rewards the loss compares (detached), so
accuracy = mean(chosen_rewards > rejected_rewards) and margin = mean(chosen_rewards - rejected_rewards).

* sigmoid (DPO, Rafailov et al. 2023): h = (pi_c - ref_c) - (pi_r - ref_r); loss = -log sigmoid(beta * h). With label
  smoothing eps (conservative DPO: each label is wrong with probability eps) the loss is the expectation over the
  label: (1 - eps) * -log sigmoid(beta * h) + eps * -log sigmoid(-beta * h). Implicit reward: beta * (pi - ref).
* ipo (Azar et al. 2023): loss = (h - 1 / (2 * beta))^2, a squared loss that pulls h to a finite target instead of
  pushing it to infinity.
* simpo (Meng et al. 2024): no reference; with length-normalised log-probs a_c, a_r:
  loss = -log sigmoid(beta * (a_c - a_r) - gamma) (gamma: target reward margin). Implicit reward: beta * a.

The losses are registered by name (`dpo.loss`) in LOSSES; a plugin adds one with `register_loss`. Every loss is called
`fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=..., label_smoothing=..., gamma=...)` (the `dpo`
section's beta, label_smoothing and simpo_gamma; accept `**kwargs` for the ones you do not use).

Nothing here knows about models or DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rlhf_ds.registry import Registry


@dataclass(frozen=True)
class PreferenceLoss:
    name: str
    fn: Callable  # fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing, gamma)
    needs_reference: bool  # False: no reference model is loaded and ref_chosen/ref_rejected are None
    averages: bool  # the default of dpo.length_normalize: log-probs averaged over the response tokens, else summed
    smooths: bool  # reads dpo.label_smoothing (else a smoothing > 0 is refused)


LOSSES = Registry("preference loss")  # name -> PreferenceLoss


def register_loss(name: str, needs_reference: bool = True, averages: bool = False, smooths: bool = False):
    """Decorator adding a loss to :data:`LOSSES` under ``name``."""

    def add(fn):
        LOSSES.register(name, PreferenceLoss(name, fn, needs_reference, averages, smooths))
        return fn

    return add


def sequence_logps(token_logp: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   prompt_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the response tokens, number of response tokens) per row of a right-padded batch, from
    `token_logp[:, t - 1]`, the log-prob of token t given the ones before it (`[B, T - 1]`).

    Token t is a response token when `prompt_len <= t` and it is a real token. Padded positions are selected away
    (never multiplied), so whatever sits there does not leak in.
    """
    positions = torch.arange(1, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    response = (positions >= prompt_lens.to(input_ids.device).unsqueeze(1)) & attention_mask[:, 1:].bool()
    total = torch.where(response, token_logp, torch.zeros_like(token_logp)).sum(-1)
    return total, response.sum(-1)


def log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = (pi_c - ref_c) - (pi_r - ref_r): how much more the policy prefers the chosen response than the reference."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


@register_loss("sigmoid", smooths=True)
def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, label_smoothing: float = 0.0,
                 **_):
    """DPO; label_smoothing > 0 gives conservative DPO (labels flipped with that probability)."""
    z = beta * log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, *_implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


@register_loss("ipo", averages=True)
def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, **_):
    """IPO: (h - 1/(2 beta))^2."""
    h = log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, *_implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


@register_loss("simpo", needs_reference=False, averages=True, smooths=True)
def simpo_loss(avg_chosen, avg_rejected, ref_chosen, ref_rejected, *, beta: float, gamma: float,
               label_smoothing: float = 0.0, **_):
    """SimPO on length-normalised log-probs, the reference ones ignored: -log sigmoid(beta * (a_c - a_r) - gamma)."""
    z = beta * (avg_chosen - avg_rejected) - gamma
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, (beta * avg_chosen).detach(), (beta * avg_rejected).detach()


def _implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def preference_loss(kind: str, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *, beta: float,
                    label_smoothing: float = 0.0, gamma: float = 0.0):
    """The registered loss `kind` on these log-probs (length-normalised by the caller where the loss's `averages` or
    dpo.length_normalize says so; a loss that needs no reference ignores the reference ones)."""
    return LOSSES.get(kind).fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta,
                               label_smoothing=label_smoothing, gamma=gamma)
