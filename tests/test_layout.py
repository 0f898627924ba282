"""The package's layering: library modules (everything but `steps/` and the CLI) never import a step, so a server,
a report or a plugin can use them without a step's imports and start-up."""
from __future__ import annotations

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "rlhf_ds")


def imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):  # function-level imports included
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_library_modules_never_import_steps():
    offenders, checked = [], 0
    for root, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(root, PACKAGE)
        if rel == "steps" or rel.startswith("steps" + os.sep):
            continue
        for name in files:
            if not name.endswith(".py") or (rel == "." and name == "cli.py"):
                continue
            checked += 1
            path = os.path.join(root, name)
            offenders += [f"{os.path.relpath(path, REPO)}: {m}" for m in imported_modules(path)
                          if m == "rlhf_ds.steps" or m.startswith("rlhf_ds.steps.")]
    assert checked > 40 and not offenders, offenders
