"""Checkpoints and resume, end to end through the real CLI on 2 CPU ranks (ZeRO-3):

* PPO stopped by SIGTERM after some step k saves, exits 75, and the resumed run reproduces the uninterrupted run's
  per-step metrics and final weights exactly (every RNG, the data position, the KL controller, the EMA shards, the
  optimizer and scheduler states are restored, and nothing the run does depends on when it started);
* `kill -9` of one rank: the job exits non-zero within seconds; the restart skips an interrupted save and a
  damaged checkpoint, resumes from the last complete one, and again reproduces the uninterrupted run;
* a config that changed in ways that break resuming, or another world size, is refused with the differences named;
* disk full while saving: the save fails with a clear error and the previous checkpoint survives;
* NaN/inf losses: stop (last good checkpoint kept) or skip, end to end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import (PPO_RESUME_STEPS, REPO, cli_env, free_port, ppo_metrics_by_step, ppo_resume_args, read_metrics,
                      run_cli)
from dist_hybrid_models import tiny_models

from rlhf_ds.checkpoint import checkpoint_problem
from rlhf_ds.engine.launcher import rank_processes

TIMEOUT = 400
PEER_DEATH_GONE_WITHIN_S = 5  # a rank's death ends the whole job (idle machine: 1.3-2.6 s, benchmarks/peer_death.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory)


def start_cli(args: list[str], ranks: int = 2) -> subprocess.Popen:
    """`rlhf-ds <step> --num-gpus N ...`: the wrapper that starts the deepspeed launcher and forwards stop signals."""
    cmd = [sys.executable, "-m", "rlhf_ds.cli", *args[:1], "--num-gpus", str(ranks), "--master-port", str(free_port()),
           *args[1:]]
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(threads=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_step(proc: subprocess.Popen, run_dir: str, step: int, timeout: float = TIMEOUT, since: float = 0.0) -> None:
    """Until the run has logged PPO step `step` (in a metrics file written after `since`: a re-run's own rows)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and os.path.getmtime(path) > since and \
                any(r.get("step", 0) >= step and "ppo/kl" in r for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def wait_until(predicate, timeout: float, poll: float = 0.001) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def alive(p: psutil.Process) -> bool:
    try:  # a killed orphan nobody reaps stays a zombie
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def checkpoint_step(name: str) -> int:
    return int(name.split("_")[1])


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def stop_after_step_2_then_resume(args: list[str], out: str) -> None:
    """Run `args` on 2 ranks, SIGTERM once step 2 is logged (exit 75, one checkpoint before the last step), then the
    same command again to the end (exit 0); the caller compares the run with an uninterrupted one."""
    proc = start_cli(args)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 75, log[-4000:]
    assert 2 <= int(checkpoints(out)[0].split("_")[1]) < PPO_RESUME_STEPS
    rc, log = finish(start_cli(args))
    assert rc == 0, log[-4000:]


def checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []


def assert_same_run(reference: str, resumed: str) -> None:
    ref, got = ppo_metrics_by_step(reference), ppo_metrics_by_step(resumed)
    assert sorted(got) == list(range(1, PPO_RESUME_STEPS + 1))
    for step in ref:
        # exactly equal: CPU kernels are deterministic for the same inputs, and every input is restored bit for bit
        assert got[step] == ref[step], f"step {step} differs: " + str(
            {k: (ref[step][k], got[step].get(k)) for k in ref[step] if got[step].get(k) != ref[step][k]})
    from safetensors.torch import load_file

    for sub in ("model", "critic", "ema"):
        if not os.path.exists(os.path.join(reference, sub)):  # no critic without GAE
            assert not os.path.exists(os.path.join(resumed, sub))
            continue
        a = load_file(os.path.join(reference, sub, "model.safetensors"))
        b = load_file(os.path.join(resumed, sub, "model.safetensors"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), f"{sub} weights differ"


@pytest.mark.parametrize("estimator", ["gae", "grpo", "tp2"])
def test_ppo_sigterm_then_resume_matches_uninterrupted_run(models, ppo_references, tmp_path, estimator):
    out, ppo_reference = str(tmp_path / "ppo"), ppo_references(estimator)
    proc = start_cli(ppo_resume_args(models, out, estimator=estimator))
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)  # to the `rlhf-ds` wrapper, which passes it to the ranks
    rc, log = finish(proc)
    assert rc == 75, log[-4000:]
    assert "stopped by SIGTERM after step" in log
    saved = checkpoints(out)
    assert len(saved) == 1, saved
    k = int(saved[0].split("_")[1])
    assert 2 <= k < PPO_RESUME_STEPS  # the stop came after the step in progress, before the end
    assert checkpoint_problem(os.path.join(out, "checkpoints", saved[0])) is None
    assert not os.path.exists(os.path.join(out, "results.json"))

    rc, log = finish(start_cli(ppo_resume_args(models, out, estimator=estimator)))
    assert rc == 0, log[-4000:]
    assert f"resuming from checkpoint {os.path.join(out, 'checkpoints', saved[0])}" in log
    assert_same_run(ppo_reference, out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)  # no step logged twice after the resume
    # results.json covers the whole run, not just the resumed part: its seconds hold every step's phases
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    phases = sum(results[f"{k}_seconds"] for k in ("generation", "scoring", "training"))
    assert results["seconds"] >= phases, results
    # and every summary figure is the uninterrupted run's (they come from the whole run's restored history)
    with open(os.path.join(ppo_reference, "results.json"), encoding="utf-8") as f:
        expected = json.load(f)
    for key in ("reward_mean", "kl", "beta", "response_length", "eos_rate", "distinct_2", "collapse_warning_steps",
                "gold_reward_first", "gold_reward_last"):
        assert results[key] == expected[key], (key, results[key], expected[key])
    # the critic exists (is trained, checkpointed, saved and holds memory) only where GAE needs it
    held = results["state_bytes_per_rank"]
    assert ("critic" in held) == (estimator != "grpo") == os.path.isdir(os.path.join(out, "critic")), held
    assert held["actor"] > held["reference"] > 0, held  # the trained actor also holds optimizer states


def test_kill9_one_rank_fails_fast_and_restart_resumes_from_last_complete(models, ppo_reference, tmp_path):
    """kill -9 of rank 1 while a checkpoint is being written, then (in the re-run, which resumes) in the middle of a
    step: each time no process of the job is left within seconds, the status names the signal, the survivor did not
    take its launcher's SIGTERM for a preemption (no save attempted), and the newest checkpoint is complete."""
    out = str(tmp_path / "ppo")
    args = ppo_resume_args(models, out, "checkpoint.every_steps=1", "checkpoint.keep_last=3",
                           "train.collective_timeout_minutes=1")
    root = os.path.join(out, "checkpoints")
    for moment in ("save", "step"):
        since = time.time()
        proc = start_cli(args)
        if moment == "save":
            wait_for_step(proc, out, 2)
            wait_until(lambda: any(d.startswith(".tmp-step_") for d in os.listdir(root)), 60)
        else:
            wait_for_step(proc, out, checkpoint_step(checkpoints(out)[-1]) + 1, since=since)
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        victim = next(p for p in rank_processes(proc.pid) if p.environ()["RANK"] == "1")
        t0 = time.time()
        victim.send_signal(signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in job), 60, poll=0.01)
        gone = time.time() - t0
        rc, log = finish(proc, timeout=120)
        print(f"kill -9 of rank 1 during a {moment}: no process of the job left after {gone:.2f} s, exit status {rc}")
        assert rc == 137 and "a rank was killed by SIGKILL" in log, log[-3000:]
        assert gone < PEER_DEATH_GONE_WITHIN_S, f"the job took {gone:.1f} s to end after a rank died"
        assert "stopped by SIGTERM" not in log  # its launcher's SIGTERM was not taken for a preemption
        saved = checkpoints(out)
        assert saved and checkpoint_problem(os.path.join(root, saved[-1])) is None, log[-3000:]

    # what a kill in the middle of a save leaves, plus a newer checkpoint that lost a file (e.g. a bad copy)
    newest = int(saved[-1].split("_")[1])
    good = saved[-2] if len(saved) > 1 else None
    interrupted = os.path.join(root, f".tmp-step_{newest + 1:08d}")
    if not os.path.exists(interrupted):  # (the kill may have hit a save already)
        shutil.copytree(os.path.join(root, saved[-1]), interrupted)
        os.remove(os.path.join(interrupted, "COMPLETE"))
    os.remove(os.path.join(root, saved[-1], "rank_00001.pt"))
    rc, log = finish(start_cli(args))
    assert rc == 0, log[-4000:]
    assert f"checkpoint {os.path.join(root, saved[-1])} skipped: missing file rank_00001.pt" in log
    assert "removing the interrupted checkpoint save" in log
    if good:
        assert f"resuming from checkpoint {os.path.join(root, good)}" in log
    assert not any(d.startswith(".tmp-") for d in os.listdir(root))
    assert_same_run(ppo_reference, out)


# ---- SFT on one rank: config checks, disk full, non-finite losses ------------------------------------------------
SFT_ARGS = ["train.max_steps=6", "train.micro_batch_size=4", "train.eval_every=0", "train.log_every=1",
            "checkpoint.every_minutes=0"]


def sft(tiny_base: str, out: str, *extra: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(["sft", f"output_dir={out}", f"model={tiny_base}", *SFT_ARGS, *extra], ranks=ranks, check=check)


def test_resume_refuses_changed_batch_shape_and_world_size(tiny_base, tmp_path):
    out = str(tmp_path / "sft")
    sft(tiny_base, out, "train.max_steps=2", "checkpoint.every_steps=2")
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
        config_before = f.read()
    proc = sft(tiny_base, out, "train.max_steps=2", "train.micro_batch_size=8", "train.grad_accum=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "in ways that break resuming" in proc.stderr
    assert "train.micro_batch_size: 4 -> 8" in proc.stderr and "train.grad_accum: 1 -> 2" in proc.stderr
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
        assert f.read() == config_before  # nothing of the run was overwritten

    proc = sft(tiny_base, out, "train.max_steps=2", ranks=2, check=False)
    assert proc.returncode == 2
    assert "was written by 1 ranks and this run has 2" in proc.stdout + proc.stderr

    # a change that does not break resuming is allowed and logged; --resume never starts afresh
    proc = sft(tiny_base, out, "train.max_steps=2", "train.log_every=2")
    assert "resuming with config changes" in proc.stderr and "train.log_every: 1 -> 2" in proc.stderr
    proc = run_cli(["sft", "--resume", "never", f"output_dir={out}", f"model={tiny_base}", *SFT_ARGS,
                    "train.max_steps=2"])
    assert "removing the old checkpoints" in proc.stderr
    assert checkpoints(out) == []


def test_disk_full_while_saving_keeps_previous_checkpoint(tiny_base, tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    probe = str(tmp_path / "probe")
    sft(tiny_base, probe, "train.max_steps=1", "checkpoint.every_steps=1")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(probe, "checkpoints"))
               for f in fs)
    # room for one checkpoint and a half: the second save runs out of space
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        out = str(tmp_path / "sft")
        proc = sft(tiny_base, out, "checkpoint.every_steps=2", f"checkpoint.dir={mnt}", check=False)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"saving checkpoint {mnt}/step_00000004 failed" in proc.stderr
        assert f"MiB on {mnt}: the disk is full" in proc.stderr
        assert f"The last complete checkpoint ({mnt}/step_00000002) is kept" in proc.stderr
        assert sorted(d for d in os.listdir(mnt) if not d.startswith(".tmp-")) == ["latest", "step_00000002"]
        assert checkpoint_problem(str(mnt / "step_00000002")) is None
        with open(mnt / "latest", encoding="utf-8") as f:
            assert f.read().strip() == "step_00000002"
        assert not os.path.exists(os.path.join(out, "model"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_nonfinite_loss_stop_keeps_last_good_checkpoint(tiny_base, tmp_path):
    """An absurd learning rate blows the weights up after step 1: the loss of step 2 is inf/NaN."""
    out = str(tmp_path / "sft")
    proc = sft(tiny_base, out, "engine.lr=1e30", "engine.warmup_ratio=0", "engine.zero_stage=3",
               "train.on_nonfinite_loss=stop", "checkpoint.every_steps=1", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "loss is" in proc.stderr and "train.on_nonfinite_loss=stop" in proc.stderr
    assert checkpoints(out) == ["step_00000001"]
    assert checkpoint_problem(os.path.join(out, "checkpoints", "step_00000001")) is None
    assert not os.path.exists(os.path.join(out, "model"))


def test_nonfinite_loss_skip_gives_up_after_limit(tiny_base, tmp_path):
    out = str(tmp_path / "sft")
    proc = sft(tiny_base, out, "engine.lr=1e30", "engine.warmup_ratio=0", "engine.zero_stage=3",
               "train.max_nonfinite_steps=2", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("optimizer step skipped on every rank") == 3
    assert "more than train.max_nonfinite_steps=2" in proc.stderr
    losses = [r["sft/loss"] for r in read_metrics(out) if "sft/loss" in r]
    assert losses and all(json.dumps(x) in ("NaN", "Infinity") for x in losses[1:])


@pytest.mark.parametrize("stage,accum", [(0, 2), (3, 2)])
def test_nonfinite_loss_on_one_rank_skips_the_step_on_all_ranks(stage, accum, tmp_path):
    """ZeRO-3 drops a step with NaN gradients itself; at stage 0 the guard clears the gradients. Either way the step
    with the NaN (on rank 1 only) leaves every weight bit-identical, and training goes on with finite weights."""
    out = str(tmp_path / "nonfinite.json")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(free_port()), os.path.join(REPO, "tests", "dist_nonfinite.py"), str(stage), str(accum), out]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    steps = {r["step"]: r for r in result["steps"]}
    assert steps[2]["changed"] == 0 and steps[2]["skipped"] == 1
    for s in (1, 3, 4):
        assert steps[s]["changed"] == steps[s]["tensors"] and steps[s]["finite"]
    assert steps[4]["skipped"] == 1
    assert result["stopped"] and "train.on_nonfinite_loss=stop" in result["stopped"]
