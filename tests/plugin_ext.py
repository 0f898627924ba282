"""A plugin from outside the package, as a user writes one (tests/test_plugins.py names it in `plugins`):

* advantage estimator `grpo_median`: A = R - the median R of the prompt's group (the mean of the two middle values
  for an even group), R = score - beta * the response's summed KL, on every response token;
* reward source `word_count`: `scale` x the number of whitespace-separated words of each response;
* preference loss `hinge`: relu(1 - beta * h), h = (pi_c - ref_c) - (pi_r - ref_r); implicit rewards beta * (pi - ref).

With $PLUGIN_EXT_RECORD set to a folder, the estimator and the reward source append what they saw and gave, one JSON
line per call, to `<folder>/<name>.jsonl`, for the test to redo by hand.
"""
from __future__ import annotations

import json
import os

import torch

from rlhf_ds.rewards.base import SOURCES
from rlhf_ds.rl.advantages import register
from rlhf_ds.rl.preference import register_loss


def _record(name: str, row: dict) -> None:
    folder = os.environ.get("PLUGIN_EXT_RECORD")
    if folder:
        with open(os.path.join(folder, f"{name}.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def group_median(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's group median, one entry per sample."""
    out = torch.empty_like(x)
    for g in group_ids.unique():
        members = group_ids == g
        v = x[members].sort().values
        out[members] = (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
    return out


@register("grpo_median", needs_groups=True)
def grpo_median(inp, cfg):
    m = inp.mask.bool()
    reward = inp.scores.to(inp.kl.dtype) - inp.beta * torch.where(m, inp.kl, torch.zeros_like(inp.kl)).sum(1)
    a = reward - group_median(reward, inp.group_ids)
    advantages = torch.where(m, a[:, None].expand(m.shape), torch.zeros_like(inp.kl))
    _record("grpo_median", {"rewards": reward.tolist(), "group_ids": inp.group_ids.tolist(),
                            "lengths": m.sum(1).tolist(), "advantages": advantages.tolist()})
    return advantages, advantages


@SOURCES.register("word_count")
class WordCount:
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, batch) -> torch.Tensor:
        scores = [self.scale * len(r.split()) for r in batch.responses]
        _record("word_count", {"responses": batch.responses, "scores": scores})
        return torch.tensor(scores, dtype=torch.float32)


@register_loss("hinge")
def hinge(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, **_):
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return torch.relu(1.0 - (chosen - rejected)), chosen.detach(), rejected.detach()
