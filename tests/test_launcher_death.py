"""The processes above the ranks: when one dies, the ranks stop, the status says so, and a re-run resumes safely.

* `kill -9` of the `rlhf-ds` wrapper, of DeepSpeed's runner and of `deepspeed.launcher.launch` during a real 2-rank
  PPO run: within seconds no rank is left, the exit status is not 0, the newest checkpoint is complete, a second job
  on the live run directory is refused with status 2 naming the holder, and the same command afterwards resumes
  (the lock died with its holder) and ends equal to the uninterrupted run (metrics and weights);
* the run-directory lock: a live holder is named, a dead one blocks nothing, and every rank of a refused job exits 2;
* `rlhf-ds pipeline` and launch/slurm.sbatch (on a real one-host Slurm cluster) count a step's death by signal as a
  failure, with the signal named, and do not requeue it;
* what the supervisor makes of each launcher status, and the start-up cleanup of a `.tmp-*` plain file.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, cli_env, free_port, ppo_resume_args, run_cli
from test_launch import CLUSTER, LAUNCH, _job_env, _read, slurm  # noqa: F401  (slurm: the cluster fixture)
from test_resume import assert_same_run, checkpoints, finish, models, start_cli, wait_for_step  # noqa: F401

from rlhf_ds import run_lock
from rlhf_ds.checkpoint import CheckpointManager, checkpoint_problem
from rlhf_ds.config import load_config, to_dict
from rlhf_ds.engine.launcher import launch_result, rank_processes

RANKS_GONE_WITHIN_S = 5


def alive(p: psutil.Process) -> bool:
    """Running, and not a zombie (a killed orphan stays one where PID 1 never reaps, as in some containers)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def seconds_until_gone(processes: list, timeout: float = 30) -> float:
    t0 = time.time()
    while any(alive(p) for p in processes) and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert not any(alive(p) for p in processes), f"still running {timeout} s later: {[p.pid for p in processes]}"
    return time.time() - t0


def launcher_tree(wrapper_pid: int) -> dict[str, psutil.Process]:
    """The `rlhf-ds --num-gpus` wrapper, DeepSpeed's runner (its child) and deepspeed.launcher.launch (the runner's)."""
    wrapper = psutil.Process(wrapper_pid)
    runner = wrapper.children()[0]
    return {"wrapper": wrapper, "runner": runner, "launch.py": runner.children()[0]}


def running_ranks(top_pid: int, n: int = 2, timeout: float = 300) -> list:
    """The `n` rank processes under `top_pid`, once they all exist."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = [p for p in rank_processes(top_pid) if p.pid != top_pid]
        if len(ranks) == n:
            return ranks
        time.sleep(0.2)
    raise AssertionError(f"{n} ranks never appeared under pid {top_pid}")


# ---- kill -9 of each launcher process during real PPO ----------------------------------------------------------------
def test_kill9_of_each_launcher_process_stops_the_ranks_and_the_rerun_resumes(models, ppo_reference,  # noqa: F811
                                                                            tmp_path):
    """One PPO run killed three times, through the wrapper, DeepSpeed's runner and launch.py in turn, each re-run
    killed once it has resumed from the newest checkpoint; the run that finally completes equals the uninterrupted
    one (one run for the three kills: each start of a tiny run is most of its time)."""
    out = str(tmp_path / "ppo")
    args = ppo_resume_args(models, out, "checkpoint.every_steps=1")
    step, started = 2, 0.0
    for target in ("wrapper", "runner", "launch.py"):
        proc = start_cli(args)
        wait_for_step(proc, out, step, since=started)
        tree = launcher_tree(proc.pid)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2 and all(r.ppid() == tree["launch.py"].pid for r in ranks)
        rank0 = next(r for r in ranks if r.environ()["RANK"] == "0")
        if target == "wrapper":
            # one writer per run directory: a second job is refused at once, naming the live holder (rank 0)
            t0 = time.time()
            rc, log = finish(start_cli(args), timeout=60)
            assert rc == 2, log[-3000:]
            assert f"is in use by another job (host {socket.gethostname()}, pid {rank0.pid}" in log
            print(f"second job refused in {time.time() - t0:.1f} s")

        tree[target].kill()
        gone = seconds_until_gone(ranks)
        print(f"kill -9 {target}: no rank left after {gone:.2f} s")
        assert gone < RANKS_GONE_WITHIN_S
        rc, log = finish(proc, timeout=60)
        assert rc != 0, log[-3000:]
        seconds_until_gone(list(tree.values()))  # the launchers follow their ranks (launch.py takes a few seconds)
        if target == "runner":
            assert "was killed by SIGKILL; exit status 137" in log
        if target == "launch.py":
            assert "2 rank(s) never returned from the step" in log and "exit status 1" in log
        if target != "wrapper":  # (the lock died with its holder)
            assert "resuming from checkpoint" in log
        saved = checkpoints(out)
        assert saved and checkpoint_problem(os.path.join(out, "checkpoints", saved[-1])) is None
        time.sleep(1)
        assert checkpoints(out) == saved  # nobody trains on
        # the next run is killed once it has resumed from this checkpoint (its metrics file rewritten to these rows):
        # the steps of these tiny runs take about a second, so waiting for more would run out of steps
        step, started = int(saved[-1].split("_")[1]), time.time()

    rc, log = finish(start_cli(args))  # the same command: no stale lock, resumes
    assert rc == 0, log[-4000:]
    assert "resuming from checkpoint" in log
    assert_same_run(ppo_reference, out)


# ---- the run-directory lock ----------------------------------------------------------------------------------------
def hold_in_another_process(run_dir: str) -> subprocess.Popen:
    code = ("import sys, time; from rlhf_ds import run_lock; run_lock.hold(sys.argv[1]); print('held', flush=True); "
            "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, run_dir], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("target", ["launch.py"])  # "runner" passes too (137); one real run keeps the suite short
def test_bare_single_node_script_fails_when_its_launcher_is_killed(models, tmp_path, target):  # noqa: F811
    """launch/single_node.sh runs DeepSpeed's runner under the supervisor: a killed launch.py (which the runner reports
    as success) or runner gives a non-zero status, and no rank outlives it."""
    out = str(tmp_path / "ppo")
    env = {**cli_env(threads=1), "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
           "DEEPSPEED": f"{sys.executable} -m deepspeed.launcher.runner"}
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "single_node.sh"), *ppo_resume_args(models, out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(proc, out, 1)
    supervisor = psutil.Process(proc.pid)  # the script exec'd it
    runner = supervisor.children()[0]
    victim = {"runner": runner, "launch.py": runner.children()[0]}[target]
    ranks = running_ranks(proc.pid)
    victim.kill()
    gone = seconds_until_gone(ranks)
    rc, log = finish(proc, timeout=60)
    print(f"single_node.sh, kill -9 {target}: no rank left after {gone:.2f} s, exit status {rc}")
    assert gone < RANKS_GONE_WITHIN_S
    assert rc == {"runner": 137, "launch.py": 1}[target], log[-3000:]
    seconds_until_gone([runner, *runner.children(recursive=True)] if runner.is_running() else [])


def test_run_dir_lock_names_a_live_holder_and_dies_with_it(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = hold_in_another_process(run_dir)
    try:
        message = run_lock.holder(run_dir)
        assert f"is in use by another job (host {socket.gethostname()}, pid {holder.pid}, since " in message
        with pytest.raises(run_lock.RunDirInUse, match=f"pid {holder.pid}"):
            run_lock.hold(run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert run_lock.holder(run_dir) is None  # the kernel dropped the lock of the killed holder
    run_lock.hold(run_dir)
    run_lock.hold(run_dir)  # again in the same process: nothing to do
    with open(os.path.join(run_dir, run_lock.LOCK_FILE), encoding="utf-8") as f:
        assert json.load(f)["pid"] == os.getpid()


def test_every_rank_of_a_job_on_a_held_run_dir_exits_2_before_writing(models, tmp_path):  # noqa: F811
    out = str(tmp_path / "ppo")
    holder = hold_in_another_process(out)
    try:
        proc = run_cli(ppo_resume_args(models, out), ranks=2, timeout=300, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.count(f"pid {holder.pid}") == 1  # said once, by rank 0
    assert os.listdir(out) == [run_lock.LOCK_FILE]  # no logs, no config: the holder's directory is untouched


# ---- the pipeline ----------------------------------------------------------------------------------------------------
def test_pipeline_counts_a_step_killed_by_a_signal_as_failed(models, tmp_path):  # noqa: F811
    run = str(tmp_path / "pipe")
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "pipeline", f"output_dir={run}", "only=ppo", "num_gpus=2",
           "report=false", f"sft_model={models['gpt2']}", f"reward_model={models['gpt2_rm']}",
           *[f"ppo.{a}" for a in ppo_resume_args(models, run)[4:]]]
    pipe = subprocess.Popen(cmd, cwd=REPO, env=cli_env(threads=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        ranks = running_ranks(pipe.pid)
        second = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"pid {pipe.pid}" in second.stderr, second.stderr[-2000:]
        runner = psutil.Process(pipe.pid).children()[0]
        runner.kill()
        gone = seconds_until_gone(ranks)
        print(f"pipeline: kill -9 of the step's runner: no rank left after {gone:.2f} s")
        assert gone < RANKS_GONE_WITHIN_S
        out, _ = pipe.communicate(timeout=60)
    finally:
        if pipe.poll() is None:
            pipe.kill()
    assert pipe.returncode == 1, out[-3000:]
    assert "step 'ppo' failed (exit 137: deepspeed" in out and "was killed by SIGKILL)" in out, out[-3000:]
    with open(os.path.join(run, "pipeline.json"), encoding="utf-8") as f:
        step = json.load(f)["steps"]["ppo"]
    assert (step["status"], step["exit_code"]) == ("failed", 137)


# ---- launch/slurm.sbatch on a real Slurm cluster ---------------------------------------------------------------------
@pytest.mark.parametrize("mode,kill,status,ranks", [("tasks", "rank", "137:0", 1), ("launcher", "launcher", "1:0", 2)])
def test_slurm_counts_a_step_death_by_signal_as_failed_not_requeued(slurm, tmp_path, mode, kill, status,  # noqa: F811
                                                                     ranks):
    """tasks: the rank (one task) SIGKILLs itself, srun reports 137; launcher: rank 0 SIGKILLs DeepSpeed's launch.py,
    whose runner then exits 0, which the supervisor in the script turns into 1. Either way the job fails, unrequeued."""
    out = str(tmp_path / "run")
    job_out = str(tmp_path / "job-%j.out")
    layout = ["--ntasks-per-node=1", f"--cpus-per-task={ranks}"]
    env = _job_env(ENTRY_MODULE="fake_step", GPUS_PER_NODE=str(ranks), LAUNCH_MODE=mode)
    env["PYTHONPATH"] = CLUSTER + os.pathsep + env["PYTHONPATH"]
    job = slurm.sbatch(["--nodes=1", *layout, "--time=3", f"--output={job_out}", os.path.join(LAUNCH, "slurm.sbatch"),
                        "fake", f"output_dir={out}", f"kill={kill}"], env=env, cwd=REPO)
    try:
        info = slurm.wait(job, timeout=120)
    except TimeoutError:
        subprocess.run(["scancel", job], env=slurm.env, timeout=10)
        raise
    log = _read(job_out.replace("%j", job))
    assert (info["JobState"], info["ExitCode"], info.get("Restarts", "0")) == ("FAILED", status, "0"), f"{info}\n{log}"
    assert "requeueing job" not in log
    if mode == "tasks":
        assert "died of SIGKILL (exit status 137): the step failed; not requeueing" in log, log[-3000:]
    else:
        assert "2 rank(s) never returned from the step" in log and "exit status 1" in log, log[-3000:]
    assert sorted(f for f in os.listdir(out) if f.startswith("ready.")) == [f"ready.{r}" for r in range(ranks)]


# ---- pure parts ------------------------------------------------------------------------------------------------------
def test_launch_result_never_hides_a_death_by_signal():
    assert launch_result(-9, "deepspeed", 0) == (137, "deepspeed was killed by SIGKILL")
    assert launch_result(247, "deepspeed", 0) == (137, "a rank was killed by SIGKILL (deepspeed exited 247)")
    status, problem = launch_result(0, "deepspeed", 2)
    assert status == 1 and "exited 0 but 2 rank(s) never returned" in problem
    for rc in (0, 1, 2, 75):  # the ranks' own statuses pass through
        assert launch_result(rc, "deepspeed", 0) == (rc, None)


def test_start_up_removes_a_stale_tmp_file_as_well_as_a_folder(tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step_00000003").mkdir(parents=True)
    (root / ".tmp-step_00000003" / "rank_00000.pt").write_bytes(b"x")
    (root / ".tmp-k2j4h1xz").write_text("step_00000002\n")  # a `latest` whose replacement was cut short
    cfg = load_config("sft", None, [f"output_dir={tmp_path / 'run'}"])
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        manager = CheckpointManager(cfg, "sft", to_dict(cfg))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    logger = logging.getLogger("rlhf_ds")  # (it may not propagate to caplog's root handler)
    logger.addHandler(caplog.handler)
    try:
        manager.prepare_dir()
    finally:
        logger.removeHandler(caplog.handler)
    assert os.listdir(root) == []
    assert f"removing the interrupted checkpoint save {root / '.tmp-step_00000003'}" in caplog.text
    assert f"removing the temp file of an interrupted write {root / '.tmp-k2j4h1xz'}" in caplog.text
