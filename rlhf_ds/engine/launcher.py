"""Running a step under the `deepspeed` launcher, and making sure its ranks never outlive the processes above them.

Supervisor side (`rlhf-ds <step> --num-gpus N`, each step of `rlhf-ds pipeline`, and `python -m rlhf_ds.engine.launcher`
in launch/slurm.sbatch): `supervise` starts DeepSpeed's runner (or a single step process), passes SIGTERM/SIGUSR1 on
to the ranks, and turns what comes back into an exit status that never hides a death by signal. DeepSpeed's runner
exits 0 when its `deepspeed.launcher.launch` child dies of a signal (it passes on positive statuses only), so a rank
records in a folder of the supervisor's that it returned from its step, and a launcher that reports success while a
rank never got that far is a failure.

Rank side: `start_rank`, the first thing a step process does, gives it its own stop-signal handler (never the ignored
dispositions the supervisor's launcher was started with) and, under a launcher, `watch_launcher`: a watchdog that ends
the rank at once (status 1, no checkpoint written) when the process that started it dies, or any launcher process
above it up to `$RLHF_DS_LAUNCHER_PID` (which the supervisor and the launch/ scripts set), or a peer rank started by
the same launcher. A stop signal means preemption (save and exit 75) unless a local peer rank has died: DeepSpeed's
launcher answers a rank's death by SIGTERMing the others, which then exit at once without trying to save (the peer is
gone: no collective can complete), so the newest complete checkpoint stays the one to resume from.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, NamedTuple, Optional

from rlhf_ds import run_lock

log = logging.getLogger("rlhf_ds")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped by a signal, checkpoint saved, run me again" (launch/slurm.sbatch)
LAUNCHER_GONE_EXIT_CODE = 1  # a rank whose launcher died: an ordinary failure to whatever launcher is left
LAUNCHER_PID_ENV = "RLHF_DS_LAUNCHER_PID"  # the outermost launcher process of this node's ranks
EXIT_RECORDS_ENV = "RLHF_DS_EXIT_RECORDS"  # the supervisor's folder where each rank notes that it returned
END_WITH_SSH_ENV = "RLHF_DS_END_WITH_SSH"  # "1": a rank started over ssh ends with its ssh session (pdsh mode)
WATCH_INTERVAL_S = 0.5
# a local peer rank gone without its launcher's SIGTERM after this long (the launcher polls its ranks every second and
# then names the dead rank's status as the job's): the rank stops on its own
PEER_DEATH_GRACE_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm's preemption and time-limit warnings, a scheduler's stop
PARENT_DEATH_SIGNAL = signal.SIGHUP  # only acted on once the launcher is really gone (see watch_launcher)
THREADS_ENV = "RLHF_DS_THREADS"  # torch threads of each process; unset: the usable cores / processes on the machine
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36
_MAX_SIGNAL = 64


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset, cgroups and Slurm narrow), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def threads_per_process(processes: int = 1) -> int:
    """Torch threads for each of `processes` processes sharing this machine: `$RLHF_DS_THREADS` when set, else the
    usable cores divided among them (at least 1): CPU processes must not oversubscribe the cores (measured: 4 threads
    on 2 cores ~100x slower; 2 threads on a busy 2-core machine ~10x slower than 1). A value that is not a whole
    number >= 1 is a ValueError naming the variable."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: expected a whole number of threads >= 1")
        return int(value)
    return max(1, usable_cores() // max(1, processes))


def set_process_threads(export: bool = False) -> int:
    """A command that runs as one process (generate, score, eval, rm-report, plan, serve-reward, chat, or a step run
    without a launcher) calls this once at its start: torch's threads from `threads_per_process`, said on stderr as
    one INFO line (the process is rank 0). `export` also sets `$RLHF_DS_THREADS`, so that a step's process-group
    setup keeps the number."""
    import torch

    n = threads_per_process(1)
    source = f"${THREADS_ENV}" if os.environ.get(THREADS_ENV, "").strip() else f"{usable_cores()} usable cores"
    torch.set_num_threads(n)
    if export:
        os.environ[THREADS_ENV] = str(n)
    print(f"{time.strftime('%H:%M:%S')} [rank0] INFO torch threads: {n} (from {source}; set {THREADS_ENV} to "
          "change)", file=sys.stderr, flush=True)
    return n


def deepspeed_command(step_argv: list[str], num_gpus: int, master_port: int | None = None) -> list[str]:
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", str(num_gpus), "--no_local_rank"]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", "rlhf_ds.cli", *step_argv]


def relaunch(step: str, run_dir: str, step_argv: list[str], num_gpus: int, master_port: int | None = None) -> int:
    """`rlhf-ds <step> --num-gpus N`: run `rlhf_ds.cli <step_argv>` on `num_gpus` local ranks; returns the exit
    status. A run directory another job holds is refused at once, before N ranks start only to find the same (rank 0
    takes the lock)."""
    in_use = run_lock.holder(run_dir)
    if in_use:
        print(f"rlhf-ds {step}: {in_use}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    # the cores shared among the ranks unless told otherwise: CPU ranks must not oversubscribe them
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(num_gpus)))
    result = supervise(deepspeed_command(step_argv, num_gpus, master_port), env, num_gpus)
    if result.problem:
        print(f"rlhf-ds {step}: {result.problem}; exit status {result.status}", file=sys.stderr)
    return result.status


# ---- supervisor side ---------------------------------------------------------------------------------------------
class LaunchResult(NamedTuple):
    status: int  # the exit status to report: the launcher's own, 128+N for a death by signal N, 1 for a hidden death
    problem: Optional[str]  # what that status means when the ranks did not say it themselves (None: they did)


def supervise(cmd: list[str], env: dict, ranks: int, launcher: bool = True) -> LaunchResult:
    """Run `cmd`, a launcher starting `ranks` ranks of `rlhf_ds.cli` on this node (`launcher=False`: the one step
    process itself), to its end."""
    import psutil

    _set_child_subreaper()  # what the launcher leaves behind when it dies is re-parented here, see _end_leftovers
    ours = {p.pid for p in psutil.Process().children()}  # started before the launcher: not its leftovers
    with tempfile.TemporaryDirectory(prefix="rlhf_ds-exits-") as records:
        rc = call_forwarding_stop_signals(cmd, {**env, LAUNCHER_PID_ENV: str(os.getpid()), EXIT_RECORDS_ENV: records},
                                          launcher)
        result = launch_result(rc, _program(cmd), ranks - len(os.listdir(records)))
    left = _end_leftovers(ours, rank_side_too=result.status != 0)
    if left and result.status == 0:  # e.g. pdsh killed: DeepSpeed's runner exits 0 while its ssh clients run on
        return LaunchResult(1, f"{_program(cmd)} exited {rc} but left {', '.join(left)} running (killed now)")
    return result


def _end_leftovers(ours: set, rank_side_too: bool) -> list[str]:
    """Kill (SIGKILL) the launcher processes that outlived the launcher this process started and were re-parented to
    it (a child subreaper): DeepSpeed's `launch.py` when the runner was killed, `pdsh` and its `ssh` clients in pdsh
    mode (their remote ranks watch their ssh session and stop with it); with `rank_side_too` also the ranks and their
    helpers (a failed launch; after a clean one a rank's helper, e.g. a tracker's service process, ends on its own).
    Returns the names of the launcher processes killed."""
    import psutil

    try:
        adopted = [p for p in psutil.Process().children() if p.pid not in ours]
        tree = {p.pid: p for top in adopted for p in [top, *top.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return []
    killed, names = [], []
    for p in tree.values():
        try:
            rank_side = "RANK" in p.environ()
            if not rank_side_too and (rank_side or not _is_launcher(p)):
                continue  # after a clean launch only launcher programs are leftovers (not, e.g., a tracker's service)
            name = _process_name(p)
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        killed.append(p)
        if not rank_side:
            names.append(f"{name} (pid {p.pid})")
    psutil.wait_procs(killed, timeout=5)  # reaps them: each is ours, or becomes ours as its parent dies
    return names


def launch_result(rc: int, program: str, unfinished: int) -> LaunchResult:
    """The status of a launch whose launcher `program` returned `rc`, `unfinished` of its ranks never returning."""
    if rc < 0:  # the launcher itself died of a signal
        return LaunchResult(128 - rc, f"{program} was killed by {signal_name(-rc)}")
    if rc > 256 - _MAX_SIGNAL:  # DeepSpeed's launch.py exits with sys.exit(-N) for a rank that died of signal N
        return LaunchResult(128 + 256 - rc, f"a rank was killed by {signal_name(256 - rc)} ({program} exited {rc})")
    if rc == 0 and unfinished > 0:
        return LaunchResult(1, f"{program} exited 0 but {unfinished} rank(s) never returned from the step: the "
                               "deepspeed.launcher.launch process that ran them was killed (DeepSpeed's runner reports "
                               "a launcher killed by a signal as success)")
    return LaunchResult(rc, None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _program(cmd: list[str]) -> str:
    """`deepspeed`, `deepspeed.launcher.launch`, `rlhf_ds.cli`: what to call a command (line) in messages."""
    args = [a for a in cmd[1:] if a != "-u"] if os.path.basename(cmd[0]).startswith("python") else []
    if args[:1] == ["-m"] and len(args) > 1:
        return args[1]
    if args and not args[0].startswith("-"):  # a script: `python .../bin/deepspeed`
        return os.path.basename(args[0])
    return os.path.basename(cmd[0])


def call_forwarding_stop_signals(cmd: list[str], env: dict, launcher: bool = True) -> int:
    """Run `cmd` (a launcher, or with `launcher=False` one rank) and pass SIGTERM/SIGUSR1 sent to this process on to
    the ranks under it.

    The ranks then finish their step, save a checkpoint and exit 75, which the launcher passes back. The signal goes
    to the ranks only: DeepSpeed's launcher answers SIGTERM by terminating its ranks and exiting 1, and it is started
    with SIGUSR1 (a launcher: also SIGTERM) ignored so that a group-wide signal (Slurm's `--signal`, a process-group
    kill) cannot kill it either; a rank installs its own handlers. `cmd` is started to die with this process (SIGKILL
    as its parent-death signal).
    """
    import psutil

    supervisor = os.getpid()
    ignored = (signal.SIGUSR1, signal.SIGTERM) if launcher else (signal.SIGUSR1,)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: _prepare_child(supervisor, ignored))

    def forward(signum, frame):
        for process in rank_processes(proc.pid):
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _prepare_child(supervisor: int, ignored: tuple) -> None:
    """In the child between fork and exec (Popen is called from the main thread, which lives as long as the
    supervisor: a parent-death signal fires when the forking thread ends)."""
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)
    if _set_parent_death_signal(signal.SIGKILL) and os.getppid() != supervisor:
        os._exit(LAUNCHER_GONE_EXIT_CODE)  # the supervisor died before the signal was armed


def rank_processes(pid: int) -> list:
    """The rank processes below `pid` (the topmost ones with RANK in their environment; their own helper processes
    inherit it), or `pid` itself when it is the rank."""
    import psutil

    try:
        top = psutil.Process(pid)
        found = []
        for p in [top, *top.children(recursive=True)]:
            try:
                if "RANK" in p.environ():
                    found.append(p)
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
        pids = {p.pid for p in found}
        return [p for p in found if p.ppid() not in pids] or [top]
    except psutil.NoSuchProcess:
        return []


# ---- rank side -----------------------------------------------------------------------------------------------------
_started = threading.Event()  # start_rank ran
_returned = threading.Event()  # peers_may_leave: peers leaving from now on is the normal end
_loop_stop_handler: Optional[Callable[[str], None]] = None  # set once the step's loop takes stop signals over
_peers: dict = {}  # pid -> (rank, psutil.Process) of the local peer ranks seen so far


def record_exit() -> None:
    """Note in the supervisor's folder that this rank returned from its step (nothing to do without a supervisor)."""
    folder = os.environ.get(EXIT_RECORDS_ENV)
    if not folder:
        return
    try:
        open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), "w").close()
    except OSError as e:  # the supervisor will call this launch unfinished
        print(f"rlhf-ds: could not record this rank's exit in {folder}: {e}", file=sys.stderr)


def start_rank() -> None:
    """The first thing a step process does, before its heavy imports (call it from the main thread; again: nothing
    more to do): stop signals get this module's handler, and under a launcher the watchdog starts."""
    import psutil  # noqa: F401  (the handlers use it: imported before a signal can come in the middle of that)

    if _started.is_set():
        return
    _started.set()
    install_stop_handlers()
    if under_launcher():
        watch_launcher()


def install_stop_handlers() -> None:
    """SIGTERM/SIGUSR1 go to `_on_stop_signal` (whatever disposition this process inherited; a launcher started with
    them ignored passes that on to its children)."""
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)


def handle_stop_in_loop(handler: Callable[[str], None]) -> None:
    """From now on a stop signal that is not a peer's death calls `handler(signal name)` (the loop then saves a
    checkpoint at the end of its step and exits 75). Before that, during start-up, it ends the rank at once with 75:
    there is nothing to save yet, and the newest checkpoint is still the one to resume from."""
    global _loop_stop_handler
    _loop_stop_handler = handler
    install_stop_handlers()


def _on_stop_signal(signum, frame) -> None:
    name = signal_name(signum)
    if _loop_stop_handler is None:  # nothing to save yet, whatever the signal's cause (peers signalled at once,
        _stop_starting(name)        # or its launcher ending the job: the launcher then reports the dead rank's status)
    peer = peer_gone(signalled=True)
    if peer:
        _stop_rank(f"{peer} and {name} came")
    _loop_stop_handler(name)


def _stop_starting(name: str) -> None:
    try:
        print(f"rlhf-ds rank {os.environ.get('RANK', '0')}: {name} during start-up, before any step: stopping now "
              f"with status {PREEMPTED_EXIT_CODE} (nothing to save yet; run the same command to resume)",
              file=sys.stderr, flush=True)
    finally:
        os._exit(PREEMPTED_EXIT_CODE)


def peer_gone(signalled: bool = False) -> Optional[str]:
    """'peer rank K (pid P) has exited' when a rank started by this rank's parent (the per-node launcher) has died or
    exited while this one still runs its step; None otherwise (also without a launcher, and once this rank returned).
    `signalled`: a stop signal came. DeepSpeed's launcher starts all of its ranks before it watches any, so a peer
    missing from their count then is one that died before this rank saw it."""
    import psutil

    if _returned.is_set() or not under_launcher():
        return None
    expected = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1
    if len(_peers) < expected:  # a scan of every process, only until all peers are known
        try:
            parent = psutil.Process(os.getppid())
            siblings = parent.children()
        except psutil.Error:
            return None  # the launcher itself is gone: launcher_gone's business
        for p in siblings:
            try:
                if p.pid != os.getpid() and p.pid not in _peers and "RANK" in p.environ():
                    _peers[p.pid] = (p.environ()["RANK"], p)
            except psutil.Error:
                continue
        if signalled and len(_peers) < expected and _is_launcher(parent):
            return f"{expected - len(_peers)} of the {expected} other ranks of this node have exited"
    for pid, (rank, p) in list(_peers.items()):  # (the handler and the watchdog thread may both be here)
        if not _alive(p):
            return f"peer rank {rank} (pid {pid}) has exited"
    return None


def peers_may_leave() -> None:
    """This rank is done (past the last barrier with its peers, or leaving on its own): a peer that exits from now on
    has not died."""
    _returned.set()


def await_local_rank0(timeout: float = PEER_DEATH_GRACE_S) -> None:
    """Wait (at most `timeout` s) until rank 0, when it runs on this node, has exited: a rank other than 0 that leaves
    first has DeepSpeed's launcher end rank 0 (SIGTERM) before it may have said why the job stopped."""
    if os.environ.get("RANK", "0") == "0":
        return
    peer_gone()  # (finds the peers not seen yet)
    rank0 = [p for rank, p in list(_peers.values()) if rank == "0"]
    deadline = time.monotonic() + timeout
    while rank0 and _alive(rank0[0]) and time.monotonic() < deadline:
        time.sleep(0.02)


def blame_dead_peer(failure: str) -> None:
    """Call when this rank's step failed (`failure`: how). When a local peer rank has died, that death is the cause (a
    collective or a save met the closed connection first): wait for the launcher to see it and end the job (its SIGTERM
    ends this rank), so the job's status names the peer's death rather than this rank's failure; stop after
    PEER_DEATH_GRACE_S regardless. Nothing happens when every peer lives."""
    peer = peer_gone()
    if not peer:
        return
    time.sleep(PEER_DEATH_GRACE_S)  # the stop-signal handler ends the rank when the launcher's SIGTERM comes
    _stop_rank(f"{peer} ({failure})")


def watch_launcher(interval: float = WATCH_INTERVAL_S) -> None:
    """End this rank at once when the process that started it, or a launcher process above it up to
    `$RLHF_DS_LAUNCHER_PID`, dies, or when a peer rank of the same launcher has died. Call it from the main thread,
    early.

    The rank exits with status 1 without saving: a checkpoint being written is left as its temp folder, which is never
    read and is removed at the next start, so the newest complete checkpoint stays the one to resume from. On Linux the
    kernel signals the parent's death (PR_SET_PDEATHSIG); that signal also comes when merely the parent's forking
    thread ends. A Python signal handler runs only when the main thread gets back from the C call it is in (a
    collective, a long matmul), so the handlers' signals are also written to a wake-up pipe that the watchdog thread
    reads: it checks the chain and the peers on every signal, and at the latest every `interval` seconds.
    """
    parent = os.getppid()
    signal.signal(PARENT_DEATH_SIGNAL, lambda signum, frame: None)  # the watchdog acts on it, through the pipe
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    _set_parent_death_signal(PARENT_DEATH_SIGNAL)
    chain = launcher_chain()  # after arming the signal: a death from now on is seen by one or the other
    gone = launcher_gone(parent, chain)
    if gone:
        _stop_rank(gone)
    threading.Thread(target=_watch, args=(parent, chain, wake_read, interval), name="rlhf_ds-launcher-watch",
                     daemon=True).start()


def launcher_chain() -> list:
    """(pid, name, psutil.Process) of this rank's parent and each ancestor up to `$RLHF_DS_LAUNCHER_PID`; an empty
    list when that process is no ancestor of this rank any more (it died before the watch started).

    A rank started over ssh (pdsh mode: launch/multi_node_hostfile.sh sets `$RLHF_DS_END_WITH_SSH` on every node)
    watches up to its ssh session's `sshd` process instead: when the launching node's runner, pdsh or ssh client dies,
    sshd ends the session, but not the command it ran (without a terminal nothing signals it)."""
    import psutil

    ancestors = psutil.Process().parents()
    top = os.environ.get(LAUNCHER_PID_ENV)
    if top:
        pids = [p.pid for p in ancestors]
        if int(top) not in pids:
            return []
        ancestors = ancestors[:pids.index(int(top)) + 1]
    elif os.environ.get(END_WITH_SSH_ENV) == "1" and any(_is_sshd(p) for p in ancestors):
        ancestors = ancestors[:next(i for i, p in enumerate(ancestors) if _is_sshd(p)) + 1]
    else:
        ancestors = ancestors[:1]
    return [(p.pid, _process_name(p), p) for p in ancestors]


def _is_launcher(process) -> bool:
    """pdsh, its ssh clients, or DeepSpeed's runner / per-node `launch.py`."""
    import psutil

    try:
        cmdline = process.cmdline()  # Debian's /usr/bin/pdsh execs pdsh.bin as `pdsh`: its name is pdsh.bin
        return (process.name() in ("pdsh", "pdsh.bin", "ssh") or [os.path.basename(a) for a in cmdline[:1]] == ["pdsh"]
                or any("deepspeed.launcher" in a or a.endswith("/deepspeed") for a in cmdline))
    except psutil.Error:
        return False


def _is_sshd(process) -> bool:
    import psutil

    try:  # OpenSSH >= 9.8 runs a session as `sshd-session`
        return process.name().startswith("sshd")
    except psutil.Error:
        return False


def launcher_gone(parent: int, chain: list) -> Optional[str]:
    """Why this rank has no launcher any more, or None while it has."""
    if not chain:
        return f"its launcher (pid {os.environ.get(LAUNCHER_PID_ENV)}, ${LAUNCHER_PID_ENV}) is gone"
    if os.getppid() != parent:
        return f"the process that started it ({chain[0][1]}, pid {parent}) is gone"
    for pid, name, process in chain:
        if not _alive(process):
            return f"its launcher process {name} (pid {pid}) is gone"
    return None


def _watch(parent: int, chain: list, wake_read: int, interval: float) -> None:
    peer_dead_since = None
    while True:
        ready, _, _ = select.select([wake_read], [], [], interval)
        signals = set(os.read(wake_read, 512)) if ready else set()
        gone = launcher_gone(parent, chain)
        if gone:
            _stop_rank(gone)
        stop = signals & {int(s) for s in STOP_SIGNALS}
        ours = {s for s in stop if signal.getsignal(s) is _on_stop_signal}  # (a program may have its own handler)
        if ours and _loop_stop_handler is None:  # the main thread may sit in a C call: start-up stops from here
            _stop_starting(signal_name(min(ours)))
        peer = peer_gone(signalled=bool(stop))
        if peer and (stop or peer_dead_since and time.monotonic() - peer_dead_since > PEER_DEATH_GRACE_S):
            _stop_rank(peer)
        peer_dead_since = (peer_dead_since or time.monotonic()) if peer else None


def _stop_rank(reason: str) -> None:
    try:  # to the rank's log file and the console; the console may be a pipe nobody reads any more
        log.error("rank %s: %s; stopping now, without saving (the newest complete checkpoint stays the one to resume "
                  "from)", os.environ.get("RANK", "0"), reason)
    finally:
        os._exit(LAUNCHER_GONE_EXIT_CODE)


def _alive(process) -> bool:
    import psutil

    try:  # a dead process nobody reaped (PID 1 of some containers never does) is a zombie, not alive
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _process_name(process) -> str:
    import psutil

    try:
        return _program(process.cmdline())
    except (psutil.Error, IndexError):  # gone, not ours, or no command line (a kernel thread)
        return "?"


def _set_child_subreaper() -> bool:
    """Have orphaned descendants re-parented to this process instead of PID 1 (Linux >= 3.4); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies; False where the OS has no such request."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


# ---- `python -m rlhf_ds.engine.launcher --ranks N -- <launcher command>` (launch/slurm.sbatch) -------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf_ds.engine.launcher",
                                description="run a deepspeed launcher command as `rlhf-ds --num-gpus` does: stop "
                                            "signals passed on to the ranks, an exit status that never hides a death "
                                            "by signal, and ranks that end with it")
    p.add_argument("--ranks", type=int, required=True, help="ranks the command starts on this node")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the launcher command")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no launcher command given")
    result = supervise(cmd, dict(os.environ), args.ranks)
    if result.problem:
        print(f"rlhf_ds.engine.launcher: {result.problem}; exit status {result.status}", file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
