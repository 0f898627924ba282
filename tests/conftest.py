"""Shared fixtures: running the real CLI (one process or 2 ranks under the deepspeed launcher) and a tiny base model."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

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


def run_cli(args: list[str], ranks: int = 1, timeout: int = 600, check: bool = True,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`rlhf_ds.cli <args>` in one process, or on `ranks` CPU ranks through the real deepspeed launcher."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "rlhf_ds.cli", *args]
        env = cli_env(threads=2)
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
               "--master_port", str(free_port()), "--module", "rlhf_ds.cli", *args]
        env = cli_env(threads=1)
    proc = subprocess.run(cmd, cwd=REPO, env={**env, **(env_extra or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


RUN_SEPARATOR = "::"  # several CLI runs in one launch (one process group): `sft a=1 ... :: sft b=2 ...`


def run_cli_many(runs: list[list[str]], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI commands `runs` one after another in one launch (tests/dist_cli_runs.py): one process, or `ranks` CPU
    ranks through the real deepspeed launcher; fails on the first command that does."""
    argv = [a for i, args in enumerate(runs) for a in ([RUN_SEPARATOR] if i else []) + args]
    script = os.path.join(REPO, "tests", "dist_cli_runs.py")
    if ranks == 1:
        cmd, env = [sys.executable, script, *argv], cli_env(threads=2)
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
               "--master_port", str(free_port()), script, *argv]
        env = cli_env(threads=1)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def split_runs(argv: list[str]) -> list[list[str]]:
    """The CLI commands of a rank script's `::`-separated arguments."""
    runs: list[list[str]] = [[]]
    for a in argv:
        if a == RUN_SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(a)
    return runs


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


# PPO run used by the resume tests (tests/test_resume.py, and the Slurm requeue test in tests/test_launch.py): every
# kind of state a checkpoint must carry is on (EMA shards, PPO-ptx, adaptive KL controller, sampling, dropout-free
# actor), 2 ranks, ZeRO-3 for all four engines.
PPO_RESUME_STEPS = 6
PPO_RESUME_ARGS = [f"ppo.steps={PPO_RESUME_STEPS}", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=2",
                   "ppo.grad_accum=2", "generation.max_new_tokens=12", "ppo.ema_decay=0.8", "ppo.ptx_coef=0.5",
                   "ppo.kl_controller=adaptive", "ppo.kl_horizon=50", "data.max_seq_len=64", "train.log_every=1",
                   "checkpoint.every_minutes=0"]


# the same run with a critic-free estimator: GRPO (2 samples per prompt), KL as a loss, a Python rule reward summed
# with the reward model, advantages whitened across ranks; "tp2": the LLaMA-style models with tensor-parallel generation
GRPO_RESUME_ARGS = ["ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=2", "ppo.kl_loss_coef=0.05",
                    f"reward.function={os.path.join(REPO, 'examples', 'rewards', 'builtin_rules.py')}:on_topic",
                    "reward.weights.function=0.5", "ppo.whiten_scope=global"]


def ppo_resume_args(models: dict, out: str, *extra: str, estimator: str = "gae") -> list[str]:
    algo = GRPO_RESUME_ARGS if estimator == "grpo" else ["hybrid.tp_size=2"] if estimator == "tp2" else []
    arch = "llama" if estimator == "tp2" else "gpt2"
    return ["ppo", f"output_dir={out}", f"actor.model={models[arch]}", f"reward.model={models[arch + '_rm']}",
            *PPO_RESUME_ARGS, *algo, *extra]


@pytest.fixture(scope="session")
def ppo_references(tmp_path_factory):
    """The uninterrupted runs (by estimator) that interrupted-and-resumed runs must reproduce."""
    from dist_hybrid_models import tiny_models

    runs: dict[str, str] = {}

    def reference(estimator: str = "gae") -> str:
        if estimator not in runs:
            models = tiny_models(tmp_path_factory)
            out = str(tmp_path_factory.mktemp(f"ppo_reference_{estimator}") / "run")
            run_cli(ppo_resume_args(models, out, estimator=estimator), ranks=2, timeout=400)
            runs[estimator] = out
        return runs[estimator]

    return reference


@pytest.fixture(scope="session")
def ppo_reference(ppo_references) -> str:
    """The uninterrupted PPO (GAE) run."""
    return ppo_references("gae")


def ppo_metrics_by_step(run_dir: str) -> dict[int, dict]:
    """The algorithm's per-step figures (timings and throughput excluded: they are wall-clock measurements)."""
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("ppo/")} for row in read_metrics(run_dir)}


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGKILL when the process that started it dies (Linux; nothing elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    """A running `rlhf-ds serve-reward` subprocess (tests/test_rewards.py, tests/test_step3_components.py)."""

    proc: subprocess.Popen
    url: str
    port: int
    log: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_reward_server(model_dir: str, log_path: str, port: int = 0, *options: str, source: str = REPO) -> Server:
    """`rlhf-ds serve-reward MODEL --port PORT [OPTIONS]` and the URL of its "listening on" line (port 0: a free one),
    run from the checkout `source` (benchmarks/reward_server_probes.py compares another one); killed with this
    process however it ends."""
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "serve-reward", model_dir, "--port", str(port), *options]
    env = cli_env(threads=1)
    env["PYTHONPATH"] = source + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True,
                            preexec_fn=_die_with_parent)
    found = {}

    def read():  # readline blocks: a thread, so that a server that never comes up fails the test instead of hanging it
        for line in proc.stdout:
            m = re.match(r"rlhf-ds serve-reward: listening on (http://127\.0\.0\.1:(\d+)) \(model ", line)
            if m:
                found["url"], found["port"] = m.group(1), int(m.group(2))
                break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=120)
    if "url" not in found:
        proc.kill()
        raise AssertionError(f"no 'listening on' line; server log:\n{open(log_path).read()[-3000:]}")
    assert port in (0, found["port"])
    return Server(proc, found["url"], found["port"], log_path)
