"""Dynamic sampling (DAPO; `ppo.dynamic_sampling`): a rollout of groups that carry signal.

Under a group baseline a prompt whose samples all got the same task reward has zero advantage: it costs a rollout and
teaches nothing. From a weak base (almost every answer wrong) that is most groups, and the few with signal are
averaged with many zeros. Each rank therefore keeps the groups whose task rewards differ, samples
`rollout_batch_size` further prompts from its own stream of the data (`PromptStream`) and repeats, until it holds
`rollout_batch_size` groups with signal or `dynamic_sampling_max_rounds` extra rounds are spent; then it fills the
rollout up with dropped groups (no advantage from the task reward) so that every rank trains the same number of
micro-batches. Extra rounds decode with the generation copy synced for the step and score on the rank alone: there is
no collective between rounds, so ranks may run different numbers of them.

A rollout whose groups all carry signal is returned as it is: the step is then the same as without the option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rlhf_ds.rl.advantages import constant_groups
from rlhf_ds.rollout.base import RolloutBatch, concat_batches, select_samples

EXTRA_STREAM = 2  # seeds each rank's stream of extra prompts apart from the step order ([seed, epoch])


@dataclass
class Scored:
    """A rollout with its task reward (the sources' weighted sum) and each source's scores."""

    batch: RolloutBatch
    task_reward: torch.Tensor  # [B]
    components: dict[str, torch.Tensor]

    def select(self, index: list[int]) -> "Scored":
        return Scored(select_samples(self.batch, index), self.task_reward[index],
                      {k: v[index] for k, v in self.components.items()})


def group_slices(group_ids: torch.Tensor) -> list[list[int]]:
    """Sample indices of each group, groups in order of their (sorted) ids."""
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    return [torch.nonzero(inverse == g).flatten().tolist() for g in range(len(ids))]


def fill_with_signal(first: Scored, more: Callable[[], Scored], groups_wanted: int, max_rounds: int,
                     pad_token_id: int) -> tuple[Scored, dict]:
    """`groups_wanted` groups, those with signal first (in sampling order), from `first` and up to `max_rounds` calls of
    `more`; short of them, the groups without signal of `first` fill the rest. Returns the rollout (group ids
    renumbered from the first's) and the figures of the step: extra rounds, prompts sampled, groups filled, and the
    task reward and zero-signal share over every sample drawn."""
    rounds = [first]
    kept: list[tuple[int, list[int]]] = []  # (round, sample indices) of the groups with signal
    spare: list[tuple[int, list[int]]] = []  # the first round's groups without signal
    flags: list[bool] = []  # every group sampled: whether its task rewards are all equal

    def sort(scored: Scored, r: int) -> None:
        flat = constant_groups(scored.task_reward, scored.batch.group_ids).tolist()
        flags.extend(flat)
        for index, constant in zip(group_slices(scored.batch.group_ids), flat):
            if not constant:
                kept.append((r, index))
            elif r == 0:
                spare.append((r, index))

    sort(first, 0)
    while len(kept) < groups_wanted and len(rounds) <= max_rounds:
        rounds.append(more())
        sort(rounds[-1], len(rounds) - 1)
    seconds = sum(s.batch.seconds for s in rounds)  # every round's decoding, kept or not
    stats = {"gen_tokens": float(sum(s.batch.response_mask.sum().item() for s in rounds)),
             "ds_extra_rounds": float(len(rounds) - 1), "ds_prompts_sampled": float(len(flags)),
             "ds_filled_groups": float(max(0, groups_wanted - len(kept))),
             "ds_task_reward_sampled": torch.cat([s.task_reward for s in rounds]).mean().item(),
             "ds_zero_signal_sampled": sum(flags) / len(flags)}
    # in sampling order: the first round's groups keep their places
    chosen = sorted(kept[:groups_wanted] + spare[: max(0, groups_wanted - len(kept))], key=lambda g: (g[0], g[1][0]))
    if all(r == 0 for r, _ in chosen):  # the first round as it is: the step as without the option
        first.batch.seconds = seconds
        return first, stats
    parts = [rounds[r].select(index) for r, index in chosen]
    batch = concat_batches([p.batch for p in parts], pad_token_id)
    n = len(chosen[0][1])
    batch.group_ids = first.batch.group_ids[0] + torch.arange(len(chosen)).repeat_interleave(n)
    batch.seconds = seconds
    merged = Scored(batch, torch.cat([p.task_reward for p in parts]),
                    {k: torch.cat([p.components[k] for p in parts]) for k in first.components})
    return merged, stats


class PromptStream:
    """This rank's stream of extra prompts: a seeded permutation of the prompts per pass, a cursor of how many were
    taken (saved with each checkpoint, per rank, so a resumed run takes the same ones)."""

    def __init__(self, items: list, seed: int, rank: int):
        self.items, self.seed, self.rank = items, seed, rank
        self.taken = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

    def take(self, n: int) -> tuple[list, ...]:
        """The next `n` prompts, as columns (ExperienceMaker.make's ids, texts, rows)."""
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.taken, len(self.items))
            if self._order is None or self._order[0] != epoch:
                rng = np.random.default_rng([self.seed, EXTRA_STREAM, self.rank, epoch])
                self._order = (epoch, rng.permutation(len(self.items)))
            out.append(self.items[self._order[1][pos]])
            self.taken += 1
        return tuple(list(column) for column in zip(*out))

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = int(state["taken"])

    def load_resharded(self, states: list[dict]) -> None:
        """Resumed on another world size: this rank's own stream (seeded by its rank) from the furthest cursor of the
        old ranks' streams; the extra prompts it then takes are not those the old ranks would have taken."""
        self.taken = max(int(state["taken"]) for state in states)
