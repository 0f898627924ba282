"""What every reward source sees and returns, and the weighted sum PPO optimises.

A source maps a batch of (prompt, response) texts -- plus the prompt rows' other columns and the actor's token ids --
to one float per response. Sources are independent of each other; `WeightedReward` adds them up with the
`reward.weights` of the run config and keeps each one's unweighted scores for the metrics.

Besides the sources of their own keys (reward.model, reward.function, reward.url), a run names sources registered in
SOURCES: `reward.registered: {name: {option: value}}` builds each with `factory(**options)` on every rank. A plugin
registers one with `@SOURCES.register("name")` on a factory (a class or function) returning a `RewardSource`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from rlhf_ds.registry import Registry


class RewardError(RuntimeError):
    """A reward source gave no usable answer (a function's bad output, a server that is gone or answers nonsense)."""


@dataclass
class RewardBatch:
    prompts: list[str]
    responses: list[str]
    rows: list[dict]  # per sample: the prompt row's other columns (PromptExample.columns), e.g. a reference answer
    sequences: Optional[torch.Tensor] = None  # [B, P+R] actor ids (left-padded prompt + response), for a reward model
    attention_mask: Optional[torch.Tensor] = None  # [B, P+R]
    prompt_len: int = 0  # P
    env_rewards: Optional[torch.Tensor] = None  # [B] multi-turn episodes' summed environment rewards

    def __len__(self) -> int:
        return len(self.responses)


class RewardSource(Protocol):
    name: str

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        """[B] float32 on the CPU."""


SOURCES = Registry("reward source")  # name -> factory(**options) -> RewardSource (reward.registered)


def as_scores(values, n: int, who: str) -> torch.Tensor:
    """`values` as a [n] float32 CPU tensor, or RewardError naming `who`, the first bad index and its value.

    The check is the same for every source: a wrong length or a NaN would otherwise surface much later as a shape
    error or a NaN loss far from its cause.
    """
    if isinstance(values, torch.Tensor) and values.dim() != 1:
        raise RewardError(f"{who} returned a tensor of shape {tuple(values.shape)}; expected [{n}]")
    if hasattr(values, "tolist"):  # torch tensors, numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise RewardError(f"{who} returned {type(values).__name__}; expected a sequence of {n} numbers")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"{who} returned {len(values)} scores for {n} responses")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise RewardError(f"{who} returned a bad score at index {i}: {v!r} (expected a finite number)")
    return torch.tensor(values, dtype=torch.float32)


class EnvironmentReward:
    """The source "environment" (with rollout.environment): each episode's rewards from its environment, summed."""

    name = "environment"

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        if batch.env_rewards is None:
            raise RewardError("reward source 'environment' needs multi-turn episodes (rollout.environment)")
        return batch.env_rewards


@dataclass
class WeightedReward:
    parts: list[tuple[str, float, RewardSource]]  # (name, weight, source)

    def names(self) -> list[str]:
        """The sources, as `reward.weights` names them (model, function, remote)."""
        return [name for name, _, _ in self.parts]

    def __call__(self, batch: RewardBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of weight x score [B], {name: unweighted score [B]}); every source sees the whole batch."""
        n = len(batch)
        components = {name: as_scores(source(batch), n, f"reward source {name!r}") for name, _, source in self.parts}
        total = torch.zeros(n, dtype=torch.float32)
        for name, weight, _ in self.parts:
            total += weight * components[name]
        return total, components
