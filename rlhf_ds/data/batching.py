"""Which examples each rank sees, in which order.

A global batch (one optimizer step) is `micro * world * accum` examples from a seeded permutation; micro-step j of
rank r takes slice `[(j * world + r) * micro, +micro)`. So a run on 1 rank with `accum = k` and a run on k ranks with
`accum = 1` see the same examples in the same micro-batches: that is what makes ZeRO-3-vs-ZeRO-0 comparisons exact and
lets a resumed run continue from a (epoch, step) position.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping

import numpy as np


def steps_per_epoch(n_items: int, micro: int, world: int, accum: int) -> int:
    """Optimizer steps in one epoch (the ragged tail is dropped so every rank does the same number of steps)."""
    return n_items // (micro * world * accum)


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def micro_batches(
    n_items: int, micro: int, world: int, rank: int, accum: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (step, [indices of each of this rank's `accum` micro-batches]) for one epoch, from `start_step` on."""
    order = epoch_order(n_items, seed, epoch)
    per_step = micro * world * accum
    for step in range(start_step, steps_per_epoch(n_items, micro, world, accum)):
        block = order[step * per_step : (step + 1) * per_step]
        yield step, [
            block[(j * world + rank) * micro : (j * world + rank + 1) * micro].tolist() for j in range(accum)
        ]


def eval_batches(n_items: int, batch_size: int, world: int, rank: int) -> Iterator[tuple[list[int], bool]]:
    """This rank's evaluation batches as (indices, counts). Every rank yields the same number of batches, because under
    ZeRO-3 each forward gathers collectively; a rank out of items gets a stand-in batch [0] with counts=False."""
    mine = eval_shard(n_items, world, rank)
    n_batches = math.ceil(math.ceil(n_items / world) / batch_size)
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        yield (idx or [0]), bool(idx)


def eval_shard(n_items: int, world: int, rank: int) -> list[int]:
    """A rank's share of an evaluation set (strided, every item exactly once over all ranks)."""
    return list(range(rank, n_items, world))


def token_budget_groups(indices: list[int], lengths: Mapping[int, int], budget: int) -> list[list[int]]:
    """`indices` (in order) cut into micro-batches of at most `budget` tokens (`lengths[i]` tokens for item i); an item
    longer than the budget gets a micro-batch of its own."""
    groups: list[list[int]] = []
    tokens = 0
    for i in indices:
        if groups and groups[-1] and tokens + lengths[i] <= budget:
            groups[-1].append(i)
            tokens += lengths[i]
        else:
            groups.append([i])
            tokens = lengths[i]
    return groups
