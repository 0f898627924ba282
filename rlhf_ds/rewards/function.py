"""A Python reward function (`reward.function`): "package.module:function" or "path/to/file.py:function".

The function is called TRL's way, with keyword arguments only:

    fn(prompts=[...], responses=[...], **columns) -> B finite numbers

where `columns` holds, for every column that all the batch's prompt rows have, the list of its values (a reference
answer, test cases ...). Accept `**kwargs` to ignore the columns you do not use.
"""
from __future__ import annotations

import torch

from rlhf_ds.config import ConfigError
from rlhf_ds.registry import import_user_module
from rlhf_ds.rewards.base import RewardBatch, RewardError, as_scores

RESERVED = ("prompts", "responses")  # keyword names of the call itself: a prompt column of either name is not passed


def load_function(spec: str):
    """The callable `spec` names; ConfigError naming `spec` when the module, file or function is missing."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"reward.function {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    module = import_user_module(target, f"reward.function {spec!r}")
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward.function {spec!r}: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward.function {spec!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def shared_columns(rows: list[dict]) -> dict[str, list]:
    """{column: [value per row]} for the columns every row has (order of the first row); none when `rows` is empty."""
    if not rows:
        return {}
    names = [k for k in rows[0] if k not in RESERVED and all(k in r for r in rows[1:])]
    return {k: [r[k] for r in rows] for k in names}


class FunctionReward:
    name = "function"

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        try:
            out = self.fn(prompts=list(batch.prompts), responses=list(batch.responses), **shared_columns(batch.rows))
        except Exception as err:
            raise RewardError(f"reward function {self.spec} raised {type(err).__name__}: {err}") from err
        return as_scores(out, len(batch), f"reward function {self.spec}")
