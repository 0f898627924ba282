"""requirements/lock.txt is the one list of tested versions: it satisfies setup.py's ranges, it is closed under the
dependencies of what it pins, .ci/run / README / Docker install from it, and the test environment is exactly it.

Nothing here asks a registry: the ranges come from setup.py, the dependencies from the installed packages' metadata.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import sysconfig
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(REPO, "requirements", "lock.txt")
PROJECT = "rlhf-ds"


def read_lock(path: str = LOCK) -> dict[str, str]:
    """{canonical name: version} from a file of exact pins; anything else in it fails."""
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#")[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)==([0-9][A-Za-z0-9_.+!\-]*)", line)
            assert m, f"{path}:{number}: not an exact pin: {line!r}"
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"{path}:{number}: {name} pinned twice"
            pins[name] = m.group(2)
    return pins


def setup_requirements() -> dict[str, list[Requirement]]:
    """setup.py's install_requires and extras_require, read as literals (setup.py is not run)."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    groups = {"": kwargs["install_requires"], **kwargs["extras_require"]}
    return {extra: [Requirement(r) for r in reqs] for extra, reqs in groups.items()}


def same_release(pinned: str, installed: str) -> bool:
    """A build of the pinned version: 2.13.0+cpu and 2.13.0+cu128 both are torch 2.13.0."""
    return Version(installed).public == Version(pinned).public and (
        "+" not in pinned or Version(installed) == Version(pinned))


def site_distributions() -> dict[str, metadata.Distribution]:
    """What pip freeze sees: the distributions in this environment's site-packages (not copies vendored inside other
    packages, such as setuptools/_vendor, which land on sys.path once setuptools is imported)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions(path=paths)}


def installed_versions() -> dict[str, str]:
    return {name: d.version for name, d in site_distributions().items()}


def test_lock_pins_the_core_stack():
    pins = read_lock()
    for name in ("torch", "deepspeed", "transformers", "tokenizers", "peft", "datasets", "safetensors", "wandb",
                 "pytest", "pip", "setuptools"):
        assert name in pins, f"{name} not pinned in requirements/lock.txt"
    assert PROJECT not in pins and "rlhf_ds" not in pins, "the project itself is installed from the checkout"


def test_lock_satisfies_setup_ranges():
    pins = read_lock()
    for extra, requirements in setup_requirements().items():
        for req in requirements:
            name = canonicalize_name(req.name)
            assert name in pins, f"setup.py requires {req} (extra {extra!r}) but requirements/lock.txt does not pin it"
            assert req.specifier.contains(Version(pins[name]), prereleases=True), (
                f"requirements/lock.txt pins {name}=={pins[name]}, outside setup.py's {req}")


def test_setup_declares_every_imported_package():
    """Each third-party module rlhf_ds imports comes from a distribution setup.py names (not just from a
    dependency of a dependency, which a future version may drop)."""
    declared = {canonicalize_name(r.name) for reqs in setup_requirements().values() for r in reqs}
    providers = metadata.packages_distributions()
    imported = set()
    for root, _, files in os.walk(os.path.join(REPO, "rlhf_ds")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        imported.update(a.name.split(".")[0] for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported if m not in sys.stdlib_module_names and m != "rlhf_ds")
    undeclared = {m: providers.get(m) for m in third_party
                  if not {canonicalize_name(d) for d in providers.get(m, [])} & declared}
    assert not undeclared, f"imported by rlhf_ds but not declared in setup.py (module: providing distributions): {undeclared}"


def test_lock_is_closed_under_dependencies():
    """Every dependency of a pinned package (and of the project with its test extra) is pinned too, at a version
    it accepts: installing the lock can pull in nothing unpinned."""
    pins = read_lock()
    env = {"extra": ""}
    wanted = [Requirement(f"{name}=={version}") for name, version in pins.items()]
    wanted += [r for extra in ("", "test") for r in setup_requirements()[extra]]
    problems: set[str] = set()
    installed = site_distributions()
    for req in wanted:
        dist = installed.get(canonicalize_name(req.name))
        if dist is None:
            problems.add(f"{req.name} is pinned but not installed here")
            continue
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is not None and not dep.marker.evaluate(env):
                continue
            name = canonicalize_name(dep.name)
            if name not in pins:
                problems.add(f"{req.name} needs {dep}, which is not pinned")
            elif not dep.specifier.contains(Version(pins[name]), prereleases=True):
                problems.add(f"{req.name} needs {dep}, but the lock pins {name}=={pins[name]}")
    assert not problems, "\n".join(sorted(problems))


def test_environment_matches_lock():
    """The environment the tests run in holds the pinned versions; in the environment .ci/run builds
    (RLHF_DS_LOCKED_ENV=1) nothing else either (the pip freeze of it equals the lock)."""
    pins, installed = read_lock(), installed_versions()
    drift = {name: (pin, installed.get(name)) for name, pin in pins.items()
             if name not in installed or not same_release(pin, installed[name])}
    assert not drift, f"requirements/lock.txt differs from the test environment (pin, installed): {drift}"
    if os.environ.get("RLHF_DS_LOCKED_ENV") == "1":
        extra = sorted(set(installed) - set(pins) - {PROJECT})
        assert not extra, f"installed but not in requirements/lock.txt: {extra}"


def test_installs_use_the_lock():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "lock=requirements/lock.txt" in ci and '-r "$lock"' in ci
    assert "--no-deps -e ." in ci, ".ci/run installs the project without re-resolving its dependencies"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "pip install -r requirements/lock.txt" in readme
    with open(os.path.join(REPO, "requirements", "update_lock.sh"), encoding="utf-8") as f:
        update = f.read()
    assert "pip freeze --all --exclude-editable" in update and "bash .ci/run" in update
