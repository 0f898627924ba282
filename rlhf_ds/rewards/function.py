"""A Python reward function (`reward.function`): "package.module:function" or "path/to/file.py:function".

The function is called TRL's way, with keyword arguments only:

    fn(prompts=[...], responses=[...], **columns) -> B finite numbers

where `columns` holds, for every column that all the batch's prompt rows have, the list of its values (a reference
answer, test cases ...). Accept `**kwargs` to ignore the columns you do not use.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from rlhf_ds.config import ConfigError
from rlhf_ds.rewards.base import RewardBatch, RewardError, as_scores

RESERVED = ("prompts", "responses")  # keyword names of the call itself: a prompt column of either name is not passed


def load_function(spec: str):
    """The callable `spec` names; ConfigError naming `spec` when the module, file or function is missing."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"reward.function {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    module = _load_file(spec, target) if target.endswith(".py") or os.sep in target else _import(spec, target)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward.function {spec!r}: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward.function {spec!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def _import(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"reward.function {spec!r}: cannot import {name} ({err})") from None
    except Exception as err:  # the user's module failed while importing: say where, not a bare traceback
        raise ConfigError(f"reward.function {spec!r}: importing {name} failed: {type(err).__name__}: {err}") from err


def _load_file(spec: str, path: str):
    """A module from a file path (relative to the working directory), registered under a name of its own so that a
    second file of the same base name does not replace it."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigError(f"reward.function {spec!r}: no such file {full}")
    name = f"rlhf_ds_reward_fn_{abs(hash(full)):x}"
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # a dataclass defined in the file looks its module up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"reward.function {spec!r}: loading {full} failed: {type(err).__name__}: {err}") from err
    return module


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
