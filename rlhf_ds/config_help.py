"""The config keys of a step, read from the config dataclasses themselves: `rlhf-ds <step> --help` lists them (key,
type, default, meaning) and `rlhf-ds config show <step>` prints a complete default YAML with the meanings as comments.

A key's meaning is the comment on its line in `rlhf_ds/config.py` (or the comment block just above it), so the help
cannot drift from the code. A key that names a registered component also lists the names registered now (the
built-ins, and what plugins imported in this process added).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing

import yaml

from rlhf_ds.config import STEP_CONFIGS

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the source of the class (and of the dataclasses it extends): the trailing
    comment, else the comment block above."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            out.update(field_comments(base))
    block: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        if m := _COMMENT.match(line):
            block.append(m.group(1).strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            out[m.group(1)] = (m.group(2) or " ".join(block)).strip()
        block = []
    return out


def meaning(cls: type, name: str) -> str:
    """The meaning of key `name` of the config class `cls`, with the registered names for a component's key."""
    text = field_comments(cls).get(name, "")
    marks = getattr(typing.get_type_hints(cls, include_extras=True)[name], "__metadata__", ())
    names = [n for mark in marks for n in mark.registry().names()]
    return f"{text} [registered: {', '.join(names)}]" if names else text


def type_text(tp) -> str:
    """`int`, `str or null`, `fp32|bf16|fp16`, `list[str]`: a type as a user writes the value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc.split("\n\n")[0].replace("\n", " ")


def describe(obj, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(dotted key, type, default, meaning) for every leaf key of the config object `obj` (its defaults)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, type_text(hints[f.name]), value, meaning(cls, f.name)))
    return rows


def _value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...").removesuffix("...").strip()


def keys_help(step: str) -> str:
    """The epilog of `rlhf-ds <step> --help`."""
    rows = describe(STEP_CONFIGS[step]())
    width = max(len(k) for k, *_ in rows)
    lines = [f"config keys (set in --config YAML or as key=value; `rlhf-ds config show {step}` prints them as YAML):"]
    for key, tp, default, text in rows:
        lines.append(f"  {key:<{width}}  {tp} = {_value(default)}" + (f"  # {text}" if text else ""))
    return "\n".join(lines)


def default_yaml(step: str) -> str:
    """A complete YAML config of `step` with every default filled in and each key's meaning as a comment; loading it
    gives the default config."""
    return "\n".join(_yaml_lines(STEP_CONFIGS[step](), 0)) + "\n"


def _yaml_lines(obj, depth: int) -> list[str]:
    cls, pad = type(obj), "  " * depth
    lines = []
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            doc = _doc(type(value))
            lines.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            lines += _yaml_lines(value, depth + 1)
        else:
            text = meaning(cls, f.name)
            lines.append(f"{pad}{f.name}: {_value(value)}" + (f"  # {text}" if text else ""))
    return lines
