"""Step 3's components end to end (issue 11): GRPO on 2 CPU ranks against a reward model served by
`rlhf-ds serve-reward` (a real subprocess on 127.0.0.1), the server killed mid-run and the run resumed once it is back,
config refusals at load, and the planner without a critic or a reward model.

The actor is the tiny GPT-2 of `dist_hybrid_models.py`; the reward model is the tiny LLaMA RM, whose vocabulary is
another one. That choice is what makes "the remote scores equal the in-process ones" an exact statement: with another
tokenizer the in-process `ModelReward` decodes the actor's ids and re-encodes the texts with `pair_ids` (BOS + prompt +
response + EOS, as RM training did), which is exactly what `serve-reward`'s `RewardScorer` does with the texts it is
sent, with the same limits (96 positions, prompts within 48 tokens). With the actor's own tokenizer (gpt2 + gpt2_rm)
`ModelReward` scores the actor's ids as they are: a response cut at max_new_tokens has no EOS there while the server
appends one, so the two agree only on responses that ended with EOS; that pair is not compared here.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Optional

import pytest
import yaml

from conftest import REPO, cli_env, free_port, ppo_metrics_by_step, read_metrics, start_reward_server
from dist_hybrid_models import tiny_models

from rlhf_ds import cli
from rlhf_ds.checkpoint import checkpoint_problem
from rlhf_ds.config import load_config

STEPS = 5
# GRPO, 4 samples per prompt, 2 prompts per rank: 8 responses per rank in 2 micro-batches of 4, one group per prompt
GRPO = ["ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=4", f"ppo.steps={STEPS}", "ppo.rollout_batch_size=2",
        "ppo.micro_batch_size=4", "generation.max_new_tokens=10", "checkpoint.every_steps=1",
        "checkpoint.every_minutes=0", "train.log_every=1"]
TIMEOUT = 400


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory)


# ---- helpers ---------------------------------------------------------------------------------------------------------


def ppo_command(models: dict, out: str, *extra: str) -> list[str]:
    """`rlhf-ds ppo --num-gpus 2` (the wrapper that starts the deepspeed launcher): GRPO, GPT-2 actor, no critic."""
    return [sys.executable, "-m", "rlhf_ds.cli", "ppo", "--num-gpus", "2", "--master-port", str(free_port()),
            f"output_dir={out}", f"actor.model={models['gpt2']}", *GRPO, *extra]


def run(cmd: list[str], log_dir: str, name: str, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Run to its end; (exit status, stdout, stderr), both also kept under `log_dir` for a failing test's reader."""
    paths = [os.path.join(log_dir, f"{name}.{s}") for s in ("out", "err")]
    with open(paths[0], "w") as out, open(paths[1], "w") as err:
        proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), stdout=out, stderr=err, timeout=timeout)
    return proc.returncode, *(open(p).read() for p in paths)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return os.path.join(run_dir, "checkpoints", f.read().strip())


def assert_finite_rewards(run_dir: str) -> dict[int, dict]:
    steps = ppo_metrics_by_step(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, row in steps.items():
        assert math.isfinite(row["ppo/reward"]), (step, row["ppo/reward"])
        assert math.isfinite(row["ppo/policy_loss"]) and "ppo/value_loss" not in row  # GRPO: no critic to train
    return steps


# ---- 1. a served reward model scores as the in-process one does ------------------------------------------------------


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """`rlhf-ds serve-reward` of the LLaMA RM; the kill test below kills it (and starts its own on the same port)."""
    logs = tmp_path_factory.mktemp("serve_reward")
    srv = start_reward_server(models["llama_rm"], str(logs / "server.log"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def remote_run(models, server, tmp_path_factory) -> str:
    """GRPO with `reward.url` and no `reward.model` (its default, runs/rm, unset): the uninterrupted run."""
    root = tmp_path_factory.mktemp("grpo_remote")
    out = str(root / "run")
    cmd = ppo_command(models, out, "reward.model=null", f"reward.url={server.url}")
    rc, stdout, stderr = run(cmd, str(root), "remote")
    assert rc == 0, f"exit {rc}:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return out


def test_grpo_against_a_served_reward_model_scores_as_in_process(models, remote_run, tmp_path):
    remote = assert_finite_rewards(remote_run)
    with open(os.path.join(remote_run, "config.yaml"), encoding="utf-8") as f:
        reward = yaml.safe_load(f)["reward"]
    assert reward["model"] is None and reward["url"].startswith("http://127.0.0.1:")  # no reward engine in the step
    with open(os.path.join(remote_run, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["advantage_estimator"] == "grpo" and results["n_samples_per_prompt"] == 4
    assert os.path.isdir(os.path.join(remote_run, "model")) and not os.path.exists(os.path.join(remote_run, "critic"))

    # the same run with the reward model in the step instead of behind HTTP: same seeds -> same rollouts at step 1, and
    # the same scores keep every later step's update (hence rollouts) the same
    out = str(tmp_path / "in_process")
    # the same shaping as the remote run: the auto missing-EOS penalty applies to a reward model alone, not a server
    cmd = ppo_command(models, out, f"reward.model={models['llama_rm']}", "ppo.missing_eos_penalty=null")
    rc, stdout, stderr = run(cmd, str(tmp_path), "in_process")
    assert rc == 0, f"exit {rc}:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    local = assert_finite_rewards(out)
    for step in range(1, STEPS + 1):
        assert remote[step]["ppo/reward"] == pytest.approx(local[step]["ppo/reward"], abs=1e-5), step
        assert remote[step]["ppo/response_length"] == local[step]["ppo/response_length"], step  # the same rollouts
    assert len({round(remote[s]["ppo/reward"], 4) for s in remote}) == STEPS  # real scores, not a constant


# ---- 1b. eval scores with a served reward as the reward model does (before section 2 kills the server) --------------


def test_eval_with_a_served_reward_scores_as_the_reward_model_in_process(models, server, tmp_path):
    out = str(tmp_path / "eval")
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "eval", f"output_dir={out}", f"sft_model={models['llama']}",
           "ppo_model=null", f"reward_model={models['llama_rm']}", f"reward_url={server.url}", "max_prompts=6",
           "samples_per_prompt=2", "pass_threshold=0.0", "generation.max_new_tokens=8", "greedy_pass=false"]
    rc, stdout, stderr = run(cmd, str(tmp_path), "eval")
    assert rc == 0, f"exit {rc}:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"), encoding="utf-8")]
    assert len(samples) == 12
    for s in samples:  # the server's scores are the reward model's, per response
        assert s["sft_function_reward"] == pytest.approx(s["sft_rm_score"], abs=1e-4), s
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    assert res["reward_url"] == server.url and res["reward_function"] is None
    passed = [s["sft_function_reward"] >= 0.0 for s in samples]
    assert res["accuracy"]["sft"] == pytest.approx(sum(passed) / len(passed), abs=1e-12)
    assert len({round(s["sft_rm_score"], 4) for s in samples}) > 3  # real scores, not a constant
    # a server that is gone: bounded retries, then one line and exit 1
    dead = f"http://127.0.0.1:{free_port()}"
    rc, stdout, stderr = run(cmd + [f"reward_url={dead}", f"output_dir={out}_dead"], str(tmp_path), "eval_dead")
    assert rc == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert f"rlhf-ds eval: reward server {dead} gave no answer after 4 attempts: ConnectionRefusedError" in stderr
    assert not os.path.exists(os.path.join(f"{out}_dead", "results.json"))


# ---- 2. the server dies mid-run: retries, a clear error, a good checkpoint, and a resume once it is back -------------


def test_server_killed_mid_run_then_resumed_once_it_is_back(models, server, remote_run, tmp_path):
    out = str(tmp_path / "run")
    cmd = ppo_command(models, out, "reward.model=null", f"reward.url={server.url}", "reward.retries=2",
                      "reward.backoff_s=0.2", "reward.timeout_s=5")
    logs = {s: open(tmp_path / f"killed.{s}", "w") for s in ("out", "err")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(threads=1), stdout=logs["out"], stderr=logs["err"])
    try:
        deadline = time.time() + TIMEOUT
        while latest_checkpoint(out) is None:  # the first checkpoint (step 1) is there: kill the server
            assert proc.poll() is None, f"run ended (exit {proc.returncode}) before its first checkpoint"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        server.proc.kill()
        server.proc.wait()
        killed = time.time()
        rc = proc.wait(timeout=120)
        ended = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        for f in logs.values():
            f.close()
    stderr = (tmp_path / "killed.err").read_text()
    assert rc == 1, f"exit {rc}:\n{stderr[-6000:]}"
    # refused connections fail at once: 3 attempts with waits of 0.2 and 0.4 s, then the ranks end
    assert ended < 60, ended
    assert f"reward server {server.url}: " in stderr and "retry 1 of 2" in stderr and "retry 2 of 2" in stderr
    assert f"reward server {server.url} gave no answer after 3 attempts" in stderr

    last = latest_checkpoint(out)
    assert last is not None and re.fullmatch(r"step_\d{8}", os.path.basename(last))
    assert checkpoint_problem(last) is None  # the manifest (COMPLETE) names every file at its size
    saved = int(os.path.basename(last)[5:])
    assert 1 <= saved < STEPS
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith(".tmp")]

    # the server back on the same port, the same command: it resumes from that checkpoint and finishes
    back = start_reward_server(models["llama_rm"], str(tmp_path / "server2.log"), port=server.port)
    try:
        rc, stdout, stderr = run(cmd, str(tmp_path), "resumed")
    finally:
        back.stop()
    assert rc == 0, f"exit {rc}:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    assert f"restored checkpoint {last} (step {saved})" in stderr + stdout
    steps = assert_finite_rewards(out)
    # one row per step: the rows up to the checkpoint came back with it, no gap, no repeat
    assert [r["step"] for r in read_metrics(out) if "ppo/reward" in r] == list(range(1, STEPS + 1))
    # and it continued as if the server had never gone: every step's figures are those of the uninterrupted run
    uninterrupted = ppo_metrics_by_step(remote_run)
    for step in range(1, STEPS + 1):
        assert steps[step] == uninterrupted[step], step


# ---- 3. invalid combinations are refused at load ---------------------------------------------------------------------


def ppo_overrides(models: dict, out: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"actor.model={models['gpt2']}", f"reward.model={models['llama_rm']}",
            "ppo.steps=2", "ppo.rollout_batch_size=2", "ppo.micro_batch_size=2", *extra]


def test_gae_with_one_sample_and_grpo_with_a_group_are_valid(models, tmp_path):
    out = str(tmp_path / "run")
    assert load_config("ppo", None, ppo_overrides(models, out)).ppo.advantage_estimator == "gae"
    cfg = load_config("ppo", None, ppo_overrides(models, out, "ppo.advantage_estimator=grpo",
                                                 "ppo.n_samples_per_prompt=2", "reward.model=null",
                                                 f"reward.url=http://127.0.0.1:{free_port()}",
                                                 "reward.weights={remote: 2.0}"))
    assert cfg.reward.sources() == ["remote"] and cfg.reward.weights == {"remote": 2.0}
    assert not os.path.exists(out)


@pytest.mark.parametrize("extra, message", [
    (["ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=1"],
     "ppo.advantage_estimator=grpo compares the responses to one prompt: set ppo.n_samples_per_prompt >= 2"),
    (["ppo.advantage_estimator=rloo"],  # the default n is 1
     "ppo.advantage_estimator=rloo compares the responses to one prompt"),
    (["ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=4", "critic.model={actor}"],
     "ppo.advantage_estimator=grpo trains no critic, but critic.model is set"),
    (["ppo.missing_eos_penalty=0.5"], "ppo.missing_eos_penalty is 0.5: a penalty must be <= 0"),
    (["reference.engine.zero_stage=2"], "reference.engine.zero_stage is 2, but this model is frozen (no optimizer)"),
    (["reward.engine.zero_stage=1"], "reward.engine.zero_stage is 1, but this model is frozen (no optimizer)"),
    (["reward.model=null"], "ppo needs a reward: reward.model"),
    (["reward.weights={function: 0.5}"],
     "reward.weights names ['function'], but the reward sources given are ['model']"),
    (["reward.weights={rm: 1.0}"], "reward.weights names ['rm'], but the reward sources given are ['model']"),
    (["ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=3", "ppo.micro_batch_size=4"],
     "ppo.rollout_batch_size x ppo.n_samples_per_prompt (2 x 3 responses per rank) must be a multiple of"),
])
def test_invalid_combination_exits_2_at_load_with_nothing_written(models, tmp_path, capsys, extra, message):
    out = str(tmp_path / "run")
    extra = [e.replace("{actor}", models["gpt2"]) for e in extra]
    assert cli.main(["ppo", "--num-gpus", "2", *ppo_overrides(models, out, *extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ds ppo: config error: ") and message in err, err
    assert not os.path.exists(out)  # refused before any rank started: no run dir, logs or data


def test_reward_function_that_cannot_be_imported_exits_2_naming_the_spec(models, tmp_path):
    out = str(tmp_path / "run")
    spec = "no_such_reward_module_xyz:score"
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "ppo", *ppo_overrides(models, out, "reward.model=null",
                                                                       f"reward.function={spec}")]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"reward.function '{spec}': cannot import no_such_reward_module_xyz" in proc.stderr
    assert "Traceback" not in proc.stderr
    # refused before any model loads: nothing trained or saved
    assert not any(os.path.exists(os.path.join(out, d)) for d in ("model", "checkpoints", "metrics.jsonl"))


# ---- 4. the planner counts no critic for critic-free estimators, no reward model for `--reward none` ----------------


def plan(capsys, *args: str) -> dict:
    assert cli.main(["plan", "--actor", "1B", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_planner_without_critic_or_reward_model(capsys):
    gae, grpo, no_rm = plan(capsys), plan(capsys, "--advantage-estimator", "grpo"), plan(capsys, "--reward", "none")
    assert set(gae["models"]) == {"actor", "critic", "reference", "reward"}
    assert set(grpo["models"]) == {"actor", "reference", "reward"}
    assert set(no_rm["models"]) == {"actor", "critic", "reference"}
    assert not any("critic" in phase for phase in grpo["gpu"]["phase_peak_bytes"])
    assert grpo["gpu"]["peak_bytes"] < gae["gpu"]["peak_bytes"]
    assert no_rm["gpu"]["peak_bytes"] < gae["gpu"]["peak_bytes"]
    # exactly the critic's resident bytes (a trained 1B model: weights, gradients, Adam states, its reduce bucket) go
    assert gae["gpu"]["resident_bytes"] - grpo["gpu"]["resident_bytes"] == gae["models"]["critic"]["resident_gpu_bytes"]
    assert gae["models"]["critic"]["resident_gpu_bytes"] > 0
    reward = gae["models"]["reward"]["resident_gpu_bytes"]
    assert no_rm["gpu"]["resident_bytes"] == gae["gpu"]["resident_bytes"] - reward
    both = plan(capsys, "--advantage-estimator", "rloo", "--reward", "none")
    assert set(both["models"]) == {"actor", "reference"}


def test_planner_refuses_an_unknown_estimator(capsys):
    assert cli.main(["plan", "--actor", "1B", "--advantage-estimator", "ppo2", "--json"]) == 2
    assert "ppo2" in capsys.readouterr().err

