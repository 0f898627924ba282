"""What a PPO rollout looks like beyond its mean reward: how diverse the sampled responses are, and how much the reward
follows their length. Pure functions (no torch), computed per rank on each rollout and averaged over ranks like the
other PPO figures.

A policy that collapses onto one answer the reward model over-rewards keeps a tame KL for a while (the answer was
already likely under the reference), so these figures, not the KL, are what show it.
"""
from __future__ import annotations

import math
from typing import Sequence


def distinct_fraction(responses: Sequence[str]) -> float:
    """Distinct responses / responses (1.0: all different; 1/n: one answer repeated n times)."""
    return len(set(responses)) / len(responses) if responses else 0.0


def distinct_n(responses: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams over the whole rollout (words split on whitespace); 0.0 when the
    responses hold no n-gram at all."""
    grams = [tuple(words[i:i + n]) for words in (r.split() for r in responses) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences; 0.0 when it is undefined (fewer than 2 items or a constant
    sequence), so a logged figure is always a number."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs equally long sequences, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return 0.0
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def rollout_stats(responses: Sequence[str], scores: Sequence[float], lengths: Sequence[float]) -> dict[str, float]:
    """The rollout figures PPO logs as ppo/distinct_fraction, ppo/distinct_2 and ppo/reward_length_corr."""
    return {"distinct_fraction": distinct_fraction(responses), "distinct_2": distinct_n(responses, 2),
            "reward_length_corr": pearson(list(scores), list(lengths))}


def collapse_starts(values: Sequence[float], threshold: float, patience: int) -> bool:
    """True when the last `patience` values are all below `threshold` and the one before them was not (or there is
    none): the step at which a collapse warning is due, once per run of low values."""
    if patience <= 0 or len(values) < patience:
        return False
    if any(v >= threshold for v in values[-patience:]):
        return False
    return len(values) == patience or values[-patience - 1] >= threshold
