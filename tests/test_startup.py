"""A start never waits silently, and a stop signal during start-up is obeyed.

* a stale torch extension build lock (its holder died, as a rank killed while loading DeepSpeed's CPU all-reduce op
  left it) no longer hangs the next start: the start loads no JIT op, and removes the lock with a warning naming it;
  a lock in use is named with its holder and left alone;
* a JIT load that waits on such a lock anyway (CPU Adam, CUDA's fused ops) is freed by the start-up watch, which also
  reports a slow phase;
* a rank killed mid start-up leaves no lock behind, and the next start proceeds;
* ranks do not inherit ignored stop signals: SIGTERM to the ranks during start-up ends the job with status 75.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from conftest import REPO, cli_env, free_port, run_cli

from rlhf_ds.engine import startup
from rlhf_ds.engine.launcher import rank_processes

START_WITHIN_S = 60
SFT = ["train.max_steps=1", "train.micro_batch_size=4", "train.eval_every=0", "checkpoint.every_minutes=0"]


def plant_lock(folder, age_s: float) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build.ninja").write_text("# an op's build folder\n")
    lock = folder / "lock"
    lock.write_text("")
    then = time.time() - age_s
    for path in (folder / "build.ninja", lock, folder):
        os.utime(path, (then, then))
    return str(lock)


WAIT_ON_A_STALE_LOCK = """
import sys, threading
from torch.utils.file_baton import FileBaton
from rlhf_ds.engine import startup
startup.begin("imports and config")
startup.phase("DeepSpeed engine (optimizer, ZeRO partitioning)")
waiter = threading.Thread(target=FileBaton(sys.argv[1]).wait, daemon=True)
waiter.start()
waiter.join(timeout=15)
print("phases:", [name for name, _ in startup.done()])
sys.exit(1 if waiter.is_alive() else 0)
"""


def test_a_jit_load_waiting_on_a_stale_lock_is_freed_by_the_start_up_watch(tmp_path):
    """torch's own wait (`FileBaton.wait`, which polls forever) returns once the watch has judged the lock stale;
    the slow phase is reported with the phases before it."""
    lock = plant_lock(tmp_path / "cpu_adam", 600)
    env = {**cli_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path), startup.SLOW_ENV: "0.5"}
    proc = subprocess.run([sys.executable, "-c", WAIT_ON_A_STALE_LOCK, lock], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, "torch still waits on the stale lock: " + proc.stderr[-2000:]
    assert "start-up phase 'DeepSpeed engine (optimizer, ZeRO partitioning)' has taken " in proc.stderr, proc.stderr
    assert "s so far (before it: imports and config 0.0 s)" in proc.stderr
    assert f"removed the stale extension build lock {lock}" in proc.stderr
    assert "phases: ['imports and config', 'DeepSpeed engine (optimizer, ZeRO partitioning)']" in proc.stdout


def test_a_lock_younger_than_the_stale_age_or_with_fresh_files_is_left_alone(tmp_path):
    young = plant_lock(tmp_path / "a", 1)
    busy = plant_lock(tmp_path / "b", 600)
    (tmp_path / "b" / "cpu_adam.o").write_bytes(b"\0")  # the compiler just wrote an object file
    lines = startup.check_build_locks(str(tmp_path))
    assert os.path.exists(young) and os.path.exists(busy)
    assert [line.split(" is held by ")[0] for line in lines] == [
        f"torch's extension build lock {young}", f"torch's extension build lock {busy}"]
    assert startup.check_build_locks(str(tmp_path), stale_after_s=0.0)[0].startswith("warning: removed the stale")


def test_an_abandoned_lock_of_another_user_or_on_a_shared_filesystem_is_named_not_removed(tmp_path, monkeypatch):
    """Its holder may be a process this one cannot see: another user's, or a build on another node."""
    theirs = plant_lock(tmp_path / "a", 600)
    os.chown(theirs, os.getuid() + 4242, -1)
    os.utime(theirs, (time.time() - 600, time.time() - 600))
    lines = startup.check_build_locks(str(tmp_path))
    assert os.path.exists(theirs) and lines == [
        f"torch's extension build lock {theirs} looks abandoned (made 600 s ago, nothing changed in its folder for "
        f"600 s), but another user made it, whose processes this one cannot see: a start that builds or loads the a "
        f"op waits for it; remove it by hand if no build runs"]
    os.remove(theirs)
    shared = plant_lock(tmp_path / "b", 600)
    monkeypatch.setattr(startup, "filesystem_type", lambda path: "nfs4")
    assert "but it is on a nfs4 filesystem that other nodes may share" in startup.check_build_locks(str(tmp_path))[0]
    assert os.path.exists(shared)
    monkeypatch.undo()
    assert startup.filesystem_type(shared) == startup.filesystem_type(str(tmp_path)) is not None
    assert startup.check_build_locks(str(tmp_path))[0].startswith("warning: removed the stale")  # (tmp: local)


def start_sft(args: list[str], env_extra: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "sft", "--num-gpus", "2", "--master-port", str(free_port()), *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**cli_env(threads=1), **env_extra}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def ranks_under(pid: int, timeout: float = 120) -> dict[str, psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {p.environ().get("RANK"): p for p in rank_processes(pid) if p.pid != pid}
        if len(found) == 2:
            return found
        time.sleep(0.02)
    raise AssertionError("2 ranks never appeared")


def test_a_rank_killed_mid_start_up_leaves_no_lock_and_the_next_start_proceeds_past_stale_locks(tiny_base, tmp_path):
    """kill -9 of a rank 1 s into its start leaves no build lock (no JIT op is loaded); the next start, with stale locks
    planted in both of torch's layouts (`$TORCH_EXTENSIONS_DIR`: `<root>/<op>/lock`; its own cache folder:
    `<root>/<py>_<device>/<op>/lock`) as a rank killed while loading DeepSpeed's CPU all-reduce op left them, removes
    them with a warning naming each and runs; a lock whose folder a live process works in stays, its holder named."""
    root = tmp_path / "torch_extensions"
    env = {"TORCH_EXTENSIONS_DIR": str(root)}
    args = [f"output_dir={tmp_path / 'sft'}", f"model={tiny_base}", *SFT]
    proc = start_sft(args, env)
    ranks = ranks_under(proc.pid)
    time.sleep(1.0)  # importing, meeting its peer, loading the model
    ranks["1"].kill()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 137 and "a rank was killed by SIGKILL" in out, out[-3000:]
    assert startup.build_locks(str(root)) == []

    stale = [plant_lock(root / "deepspeed_shm_comm", 600), plant_lock(root / "py311_cpu" / "cpu_adam", 600)]
    busy_folder = root / "fused_adam"
    busy = plant_lock(busy_folder, 600)
    builder = subprocess.Popen(["sleep", "120"], cwd=busy_folder)  # as ninja in a build folder
    try:
        t0 = time.time()
        proc = run_cli(["sft", *args], ranks=2, timeout=START_WITHIN_S * 3, env_extra=env)
        took = time.time() - t0
    finally:
        builder.kill()
        builder.wait()
    print(f"2-rank SFT after a kill mid start-up, with planted stale locks: done in {took:.1f} s")
    assert took < START_WITHIN_S
    for lock in stale:
        assert f"removed the stale extension build lock {lock}" in proc.stderr, proc.stderr[-3000:]
        assert not os.path.exists(lock)
    assert f"extension build lock {busy} is held by sleep (pid {builder.pid})" in proc.stderr
    assert os.path.exists(busy)
    assert not os.path.exists(root / "deepspeed_shm_comm" / "deepspeed_shm_comm.so")  # nothing was built or loaded


def test_sigterm_to_the_ranks_during_start_up_ends_the_job_with_75(tiny_base, tmp_path):
    """As Slurm signals every task of a step: ranks started by a supervisor whose launcher ignores SIGTERM/SIGUSR1
    must not inherit that, and with nothing to save yet they stop at once with the requeue status."""
    proc = start_sft([f"output_dir={tmp_path / 'sft'}", f"model={tiny_base}", *SFT], {})
    ranks = ranks_under(proc.pid)
    for p in ranks.values():  # the interpreter's own start (~0.1 s) inherits what the launcher had
        wait_until(lambda: catches(p, signal.SIGTERM) and catches(p, signal.SIGUSR1), 30)
    for p in ranks.values():
        p.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    took = time.time() - t0
    assert proc.returncode == 75, out[-3000:]
    # (a rank whose peer stopped first may say that instead: the same signal ended both, and the job status is 75)
    assert "SIGTERM during start-up, before any step: stopping now with status 75" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "sft" / "checkpoints") or not os.listdir(tmp_path / "sft" / "checkpoints")
    assert took < 10, took


def catches(p: psutil.Process, signum: int) -> bool:
    """`signum` has a handler in process `p` (its SigCgt mask), which therefore does not ignore it either."""
    with open(f"/proc/{p.pid}/status", encoding="utf-8") as f:
        masks = dict(line.split(":\t", 1) for line in f if line.startswith(("SigCgt", "SigIgn")))
    return bool(int(masks["SigCgt"], 16) >> (signum - 1) & 1) and not int(masks["SigIgn"], 16) >> (signum - 1) & 1


def wait_until(predicate, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)
