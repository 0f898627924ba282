"""Pluggable components by name, and the user modules (plugins) that register more of them.

A `Registry` holds the components of one kind: advantage estimators (`rl/advantages.py`), preference losses
(`rl/preference.py`), rollout backends (`rollout/backends.py`) and reward sources (`rewards/base.py`). Each kind's
module registers its built-ins; a plugin named in a config's `plugins` list registers its own the same way when it is
imported, which `load_plugins` does before the config is checked, in every process that loads the config.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from rlhf_ds.config import ConfigError


class Registry:
    """The components of one kind (`kind` names it in messages), in the order they were registered."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, object] = {}

    def register(self, name: str, obj=None):
        """Add `obj` under `name` and return it; without `obj`, a decorator that adds what it decorates."""
        if obj is None:
            return lambda target: self.register(name, target)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)} (a plugin "
                             "registers more: `plugins` in the config)") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def __iter__(self):
        return iter(self._entries)


def load_plugins(specs: list[str]) -> None:
    """Import each plugin, "package.module" or "path/to/file.py" (relative to the working directory); importing it
    registers its components. One that is already imported in this process is not imported again."""
    for spec in specs:
        import_user_module(spec, f"plugin {spec!r}")


def import_user_module(target: str, who: str):
    """The module `target` names: a file (ends in .py or holds a path separator) or a module on the import path.
    ConfigError starting with `who` when it is missing or fails while importing."""
    return _load_file(target, who) if target.endswith(".py") or os.sep in target else _import(target, who)


def _import(name: str, who: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{who}: cannot import {name} ({err})") from None
    except Exception as err:  # the user's module failed while importing: say where, not a bare traceback
        raise ConfigError(f"{who}: importing {name} failed: {type(err).__name__}: {err}") from err


def _load_file(path: str, who: str):
    """A module from a file, under a name of its own (a second file of the same base name does not replace it), loaded
    once per process: a plugin that is also a reward function's file registers its components once."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigError(f"{who}: no such file {full}")
    name = f"rlhf_ds_user_module_{abs(hash(full)):x}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # a dataclass defined in the file looks its module up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"{who}: loading {full} failed: {type(err).__name__}: {err}") from err
    return module
