"""The PPO update's objectives for one micro-batch, from the model outputs the trainer computed (steps/ppo.py
`train_on_experience` runs the forwards, the backward and the optimizer steps).

Every term is masked by the micro-batch's action mask: the tokens the policy chose. Prompt tokens, padding and the
tokens an environment inserted between model turns (rollout/multi_turn.py) weigh nothing, whatever log-ratio,
advantage or value they carry.
"""
from __future__ import annotations

import torch

from rlhf_ds.config import PPOAlgoConfig
from rlhf_ds.rl import math as rlm


def actor_loss(logp: torch.Tensor, entropy: torch.Tensor, mb: dict, p: PPOAlgoConfig,
               norm_length: int) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (plus the KL loss with `kl_loss_coef`) and its figures. `mb` without "old_logp": on-policy,
    the update's own log-probs (detached) are the old ones, and the rollout's KL to the reference is reported here."""
    m = mb["action_mask"]
    clip_low, clip_high = p.clip_eps_low or p.clip_eps, p.clip_eps_high or p.clip_eps
    agg = dict(agg=p.loss_agg_mode, norm_length=norm_length)
    old_logp = mb.get("old_logp", logp.detach())
    pg_loss, pg = rlm.policy_loss(logp, old_logp, mb["advantages"], m, clip_low, clip_high, **agg,
                                  dual_clip=p.dual_clip)
    loss = pg_loss
    figures = {"policy_loss": pg_loss.item(), "clipfrac": float(pg["clipfrac"]), "approx_kl": float(pg["approx_kl"]),
               "ratio": float(pg["ratio_mean"]), "entropy": rlm.masked_mean(entropy, m).item()}
    if "old_logp" not in mb:
        figures["kl"] = (rlm.kl_per_token(logp.detach(), mb["ref_logp"], "k1") * m).sum(1).mean().item()
    if "dual_clipfrac" in pg:  # ppo.dual_clip set
        figures["dual_clipfrac"] = float(pg["dual_clipfrac"])
    if p.kl_loss_coef > 0:
        kl_loss, kl_mean = rlm.kl_loss(logp, mb["ref_logp"], m, p.kl_loss_estimator, **agg,
                                       log_ratio_clip=p.kl_loss_log_ratio_clip)
        loss = loss + p.kl_loss_coef * kl_loss
        figures.update(kl_loss=kl_loss.item(), kl_loss_token_mean=float(kl_mean))
    return loss, figures


def critic_loss(values: torch.Tensor, mb: dict, p: PPOAlgoConfig) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (unweighted: the trainer scales it by `vf_coef`) and its figures."""
    vf_loss, vf_clipfrac = rlm.value_loss(values, mb["old_values"], mb["returns"], mb["action_mask"], p.value_clip)
    return vf_loss, {"value_loss": vf_loss.item(), "value_clipfrac": float(vf_clipfrac)}
