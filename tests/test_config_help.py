"""Config keys a user can see without reading config.py: `<step> --help`, `config show <step>`, the docs' defaults."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cli_env
from rlhf_ds.config import STEP_CONFIGS, PipelineConfig, load_config, to_dict
from rlhf_ds.config_help import default_yaml, describe, keys_help


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_ds.cli", *args], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("step", sorted(STEP_CONFIGS))
def test_every_key_has_a_type_default_and_meaning(step):
    rows = describe(STEP_CONFIGS[step]())
    assert len(rows) >= 10
    missing = sorted({key for key, tp, _, meaning in rows if not meaning or not tp})
    assert not missing, f"{step}: config keys without a meaning (add a comment on the field in rlhf_ds/config.py): {missing}"


@pytest.mark.parametrize("step", sorted(STEP_CONFIGS))
def test_config_show_is_a_complete_default_config(step, tmp_path):
    text = default_yaml(step)
    path = tmp_path / f"{step}.yaml"
    path.write_text(text)
    loaded = load_config(step, str(path))
    assert to_dict(loaded) == to_dict(STEP_CONFIGS[step]())
    # every leaf key appears, with its meaning as a comment
    assert len([line for line in text.splitlines() if "  # " in line]) >= len(describe(STEP_CONFIGS[step]())) * 0.9


def test_step_help_lists_the_keys():
    proc = cli("ppo", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "config keys" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("ppo.kl_coef "))
    assert re.search(r"ppo\.kl_coef\s+float = 0\.1\s+# \S", line), line
    assert re.search(r"actor\.engine\.precision\s+fp32\|bf16\|fp16 = fp32", out)
    assert keys_help("ppo").splitlines()[1:] == out[out.index("config keys"):].rstrip("\n").splitlines()[1:]


def test_config_show_command(tmp_path):
    proc = cli("config", "show", "rm")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == to_dict(STEP_CONFIGS["rm"]())
    assert cli("config", "show", "nosuchstep").returncode == 2


def test_pipeline_docs_state_the_code_defaults():
    """docs/pipeline.md's table of pipeline keys gives the defaults PipelineConfig has."""
    with open(os.path.join(REPO, "docs", "pipeline.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| ((?:`\w+`(?: / )?)+) \| ([^|]+) \|", f.read(), flags=re.M)
    defaults = to_dict(PipelineConfig())
    checked = 0
    for keys, values in rows:
        names = re.findall(r"`(\w+)`", keys)
        shown = [v.strip().strip("`") for v in values.split(" / ")]
        for name, value in zip(names, shown):
            if name in defaults and not isinstance(defaults[name], dict):
                assert yaml.safe_load(value) == defaults[name], f"docs/pipeline.md says {name} = {value}"
                checked += 1
    assert checked >= 8
