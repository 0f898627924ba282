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

Nothing here knows about models or DeepSpeed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


LOSSES = ("sigmoid", "ipo", "simpo")


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


def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO; label_smoothing > 0 gives conservative DPO (labels flipped with that probability)."""
    z = beta * log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, *_implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """IPO: (h - 1/(2 beta))^2."""
    h = log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, *_implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def simpo_loss(avg_chosen, avg_rejected, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO on length-normalised log-probs (no reference): -log sigmoid(beta * (a_c - a_r) - gamma)."""
    z = beta * (avg_chosen - avg_rejected) - gamma
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, (beta * avg_chosen).detach(), (beta * avg_rejected).detach()


def _implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def preference_loss(kind: str, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *, beta: float,
                    label_smoothing: float = 0.0, gamma: float = 0.0):
    """Dispatch on `kind` (one of LOSSES). For simpo the policy log-probs must already be length-normalised and the
    reference ones are ignored."""
    if kind == "sigmoid":
        return sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    if kind == "ipo":
        return ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if kind == "simpo":
        return simpo_loss(policy_chosen, policy_rejected, beta, gamma, label_smoothing)
    raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSSES}")
