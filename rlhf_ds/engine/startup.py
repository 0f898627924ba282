"""A rank's start-up never waits silently.

A rank names what it is doing while it starts (`phase("process group")`, `phase("loading runs/sft")`, ...). A watchdog
thread reports a phase that has run longer than `$RLHF_DS_SLOW_START_S` seconds (default 30), and again each time as
long again has passed, naming the phase and the ones before it with their durations. Each time it also looks at
torch's extension build locks (the `lock` files that `torch.utils.cpp_extension` leaves in a build folder while one
process builds or loads a JIT op, which every other process then waits on forever, without a word, when their holder
died): a lock whose holder is gone is removed with a warning naming the file, one that is in use is named with what
holds it (only this user's locks on a local filesystem are judged: elsewhere the holder may be a process on another
node). `begin()` starts the watch when a training step's process starts, `done()` ends it once its loop can begin.

The ordinary CPU start loads no JIT op at all (`strategy.setup_distributed`); ZeRO-Offload's CPU Adam and CUDA's
fused ops still do, and the same lock check runs once before the first model is built.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import sys
import threading
import time
from typing import Optional

SLOW_ENV = "RLHF_DS_SLOW_START_S"
SLOW_DEFAULT_S = 30.0
# a build lock is stale when it is this old, no process works in its folder and nothing there changed for this long
STALE_AFTER_S = 10.0
_POLL_S = 0.5
CHECK_LOCK = ".rlhf_ds-lock-check"  # flock'ed while one process judges the build locks of the folders beside it


class _Phases:
    def __init__(self):
        self.lock = threading.Lock()
        self.done_phases: list[tuple[str, float]] = []
        self.current: Optional[str] = None
        self.since = time.monotonic()
        self.reported = 0  # slow-phase reports of the current phase so far
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None


_state = _Phases()


def slow_after_s() -> float:
    try:
        return max(0.1, float(os.environ.get(SLOW_ENV, SLOW_DEFAULT_S)))
    except ValueError:
        return SLOW_DEFAULT_S


def begin(name: str) -> None:
    """A training step's process starts (its first phase is `name`): phases are recorded and watched from now on."""
    with _state.lock:
        if _state.thread is not None:
            return
        _state.thread = threading.Thread(target=_watch, name="rlhf_ds-startup-watch", daemon=True)
        _state.thread.start()
    phase(name)


def phase(name: str) -> None:
    """This rank now does `name` (the phase before it ends here). Nothing before `begin()` (the tools that load a
    model: generate, score, serve-reward, ...) or after `done()` (models loaded later, e.g. for evaluation)."""
    now = time.monotonic()
    with _state.lock:
        if _state.thread is None or _state.stop.is_set():
            return
        if _state.current is not None:
            _state.done_phases.append((_state.current, now - _state.since))
        _state.current, _state.since, _state.reported = name, now, 0


def done() -> list[tuple[str, float]]:
    """Start-up is over: stop the watch; returns each phase with its seconds."""
    phase_end = time.monotonic()
    with _state.lock:
        if _state.current is not None:
            _state.done_phases.append((_state.current, phase_end - _state.since))
            _state.current = None
        _state.stop.set()
        return list(_state.done_phases)


def summary(phases: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases)


def _report(message: str) -> None:
    print(f"rlhf-ds rank {os.environ.get('RANK', '0')}: {message}", file=sys.stderr, flush=True)


def _watch() -> None:
    while not _state.stop.wait(_POLL_S):
        with _state.lock:
            name, elapsed, earlier = _state.current, time.monotonic() - _state.since, list(_state.done_phases)
            due = name is not None and elapsed >= slow_after_s() * (_state.reported + 1)
            if due:
                _state.reported += 1
        if due:
            before = f" (before it: {summary(earlier)})" if earlier else ""
            _report(f"start-up phase '{name}' has taken {elapsed:.0f} s so far{before}")
            for line in check_build_locks():
                _report(line)


# ---- torch extension build locks ------------------------------------------------------------------------------------
def extensions_root() -> str:
    """Where torch builds JIT extensions: `$TORCH_EXTENSIONS_DIR`, else torch's per-user cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def build_locks(root: str) -> list[str]:
    """The `lock` files of the op build folders under `root`: `<root>/<op>/lock` with `$TORCH_EXTENSIONS_DIR`, else
    `<root>/<py>_<device>/<op>/lock`."""
    return sorted(glob.glob(os.path.join(glob.escape(root), "*", "lock"))
                  + glob.glob(os.path.join(glob.escape(root), "*", "*", "lock")))


def check_build_locks(root: Optional[str] = None, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the build locks under `root` whose holder is gone; returns one line for each lock found (removed, or in
    use and by what).

    torch's lock is a bare file (no pid in it), so its holder is judged by the folder: a build runs `ninja` and the
    compiler with the folder as their working directory and writes files there. A lock older than `stale_after_s`
    while no process of this machine works in the folder and nothing in it changed for that long has no holder: the
    process that made it died. That is only judged for a lock of this user's on a local filesystem (elsewhere the
    holder may be a process this one cannot see); other such locks are named, not removed. Two processes deciding at
    once are serialised by a `flock` beside the lock."""
    lines = []
    for lock in build_locks(root or extensions_root()):
        folder = os.path.dirname(lock)
        with _exclusive(os.path.join(os.path.dirname(folder), CHECK_LOCK)):  # not in `folder`: that would touch it
            try:
                age = time.time() - os.stat(lock).st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            workers = processes_working_in(folder)
            quiet = time.time() - newest_change(folder, skip=(lock,))
            if workers or age < stale_after_s or quiet < stale_after_s:
                who = ", ".join(workers) or f"a process that took it {age:.0f} s ago"
                lines.append(f"torch's extension build lock {lock} is held by {who}: a start that builds or loads "
                             f"the {os.path.basename(folder)} op waits for it")
                continue
            unseen = holder_may_be_unseen(lock)
            if unseen:
                lines.append(f"torch's extension build lock {lock} looks abandoned (made {age:.0f} s ago, nothing "
                             f"changed in its folder for {quiet:.0f} s), but {unseen}, whose processes this one cannot "
                             f"see: a start that builds or loads the {os.path.basename(folder)} op waits for it; remove "
                             f"it by hand if no build runs")
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            lines.append(f"warning: removed the stale extension build lock {lock} (made {age:.0f} s ago by a process "
                         f"that is gone: nothing works in {folder} and nothing there changed for {quiet:.0f} s); "
                         f"without this every later start would wait on it forever")
    return lines


# filesystems that other machines may share: a build there may run on another node
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p",
                      "afs", "fuse")


def holder_may_be_unseen(lock: str) -> Optional[str]:
    """Why the lock's holder could live where this process cannot see it, or None: another user made the lock (their
    processes' working directories are not ours to read), or it lies on a shared filesystem (the holder may run on
    another node), or that cannot be told (no /proc/mounts)."""
    if os.stat(lock).st_uid != os.getuid():
        return "another user made it"
    fstype = filesystem_type(lock)
    if fstype is None:
        return "this machine does not say which filesystem it is on"
    if fstype.split(".")[0] in SHARED_FILESYSTEMS:
        return f"it is on a {fstype} filesystem that other nodes may share"
    return None


def filesystem_type(path: str) -> Optional[str]:
    """The type of the filesystem `path` is on (/proc/mounts, the longest mount point above it); None off Linux."""
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    best, fstype = "", None
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fstype = point, kind
    return fstype


@contextlib.contextmanager
def _exclusive(path: str):
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:  # a read-only folder: nobody can remove its lock either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def processes_working_in(folder: str) -> list[str]:
    """'name (pid N)' of the processes whose working directory is `folder` or below (those we may look at)."""
    import psutil

    real = os.path.realpath(folder)
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            cwd = p.cwd()
        except (psutil.Error, OSError):
            continue
        if cwd == real or cwd.startswith(real + os.sep):
            found.append(f"{p.info['name']} (pid {p.info['pid']})")
    return found


def newest_change(folder: str, skip: tuple = ()) -> float:
    """The newest modification time of `folder` and the files in it (0 when empty)."""
    newest = 0.0
    for dirpath, _, filenames in os.walk(folder):
        for path in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            if path in skip:
                continue
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(path).st_mtime)
    return newest
