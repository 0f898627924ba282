"""An exponential moving average of a (possibly ZeRO-3-partitioned) model, kept shard by shard on each rank.

Each rank averages only the part of every parameter it owns (ZeRO-3: `ds_tensor`), so the EMA costs 1/world of a
model copy per rank; to save it, the shards are swapped into the model, the usual gathered save runs, and the
training weights are swapped back bit-identically.
"""
from __future__ import annotations

import contextlib

import torch

from rlhf_ds.utils import rank


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(_local(p).float(), alpha=1.0 - self.decay)

    def state_dict(self) -> list[torch.Tensor]:
        """This rank's shadow shards (for its checkpoint file)."""
        return self.shadow

    def load_state_dict(self, shards: list[torch.Tensor]) -> None:
        if [s.shape for s in shards] != [s.shape for s in self.shadow]:
            raise ValueError("EMA shards in the checkpoint do not match this model's partitioning")
        with torch.no_grad():
            for s, loaded in zip(self.shadow, shards):
                s.copy_(loaded)  # stays on this rank's device (the checkpoint file is read to CPU)

    def load_resharded(self, states: list[list[torch.Tensor]]) -> None:
        """The shadow from the shards of a run on another world size (every old rank's, in rank order). A ZeRO-3
        partition is its rank's contiguous slice of the flattened parameter (the last one padded): the slices are
        joined and this rank's new slice taken. Parameters held whole were saved whole by every rank."""
        shards = []
        for i, (p, s) in enumerate(zip(self.params, self.shadow)):
            if not hasattr(p, "ds_tensor"):
                shards.append(states[0][i])
                continue
            full = torch.cat([old[i].reshape(-1) for old in states])[: p.ds_numel]
            mine = full[rank() * s.numel() : (rank() + 1) * s.numel()]
            shards.append(torch.cat([mine, mine.new_zeros(s.numel() - mine.numel())]).view_as(s))
        self.load_state_dict(shards)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside, the model's own shards hold the EMA weights (for saving); restored exactly on exit."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    _local(p).copy_(b)
