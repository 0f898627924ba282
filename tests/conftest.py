"""Shared fixtures: running the real CLI (one process or 2 ranks under the deepspeed launcher) and a tiny base model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), RLHF_DS_THREADS=str(threads), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], ranks: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`rlhf_ds.cli <args>` in one process, or on `ranks` CPU ranks through the real deepspeed launcher."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "rlhf_ds.cli", *args]
        env = cli_env(threads=2)
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
               "--master_port", str(free_port()), "--module", "rlhf_ds.cli", *args]
        env = cli_env(threads=1)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


TINY_ARCH = ["arch.n_layers=2", "arch.hidden=64", "arch.n_heads=2", "arch.max_positions=96", "arch.vocab_size=400"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """Step 0 on the built-in task: a 2-layer GPT-2 (d=64) and its tokenizer; the run dir (model under model/)."""
    out = str(tmp_path_factory.mktemp("tiny") / "pretrain")
    run_cli(["pretrain", f"output_dir={out}", *TINY_ARCH, "train.max_steps=60", "train.micro_batch_size=32",
             "engine.zero_stage=0"])
    return out
