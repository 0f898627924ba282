"""One writer per run directory.

The job that writes `<output_dir>` (rank 0 of a step, or the `rlhf-ds pipeline` process for the pipeline's run
directory) holds an exclusive `flock` on `<output_dir>/.lock` until it exits. The kernel drops the lock when the holder
dies, however it dies, so a lock can never be stale; the file itself stays and only says who held it last (host, pid,
since when). A second job on the same directory stops with exit status 2 naming the live holder.

Across nodes this needs a filesystem whose `flock` is seen by every node: Linux NFS clients turn `flock` into NFS byte
range locks (NFSv4, or NFSv3 with lockd), Lustre needs the `flock` mount option (`localflock` locks per node only),
GPFS and CephFS lock cluster-wide. Where `flock` fails (ENOLCK, EOPNOTSUPP) the job runs with a warning, unguarded. An
NFS lock whose holder's node crashed is released when the server's lease ends (NFSv4: typically 90 s), not at once.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger("rlhf_ds")

LOCK_FILE = ".lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_held: dict[str, int] = {}  # run directory -> open descriptor of the lock this process holds (until it exits)


class RunDirInUse(RuntimeError):
    """Another live job writes this run directory."""


def hold(run_dir: str) -> None:
    """Take `run_dir`'s lock for the rest of this process's life (again in the same process: nothing to do); raises
    RunDirInUse, naming the holder, while another process has it."""
    path = os.path.abspath(run_dir)
    if path in _held:
        return
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            if e.errno in _BUSY:
                raise RunDirInUse(_in_use_message(path, fd)) from None
            log.warning("cannot lock %s (%s): this filesystem gives no flock, so nothing stops a second job from "
                        "writing the same run directory", path, e)
            return
        finally:
            os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _held[path] = fd


def holder(run_dir: str) -> Optional[str]:
    """Who holds `run_dir`'s lock (the message RunDirInUse carries), or None when nobody does; takes nothing. Not for
    the holder itself: over NFS, closing any descriptor of the file drops the process's lock."""
    path = os.path.abspath(run_dir)
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError as e:
        return _in_use_message(path, fd) if e.errno in _BUSY else None
    finally:
        os.close(fd)  # (also releases the shared lock it may have taken)


def hold_for_job(run_dir: str) -> None:
    """Every rank calls this once the process group exists: rank 0 takes `run_dir`'s lock for the job; if another job
    has it, every rank raises RunDirInUse (so all exit 2 before writing anything)."""
    from rlhf_ds.engine import strategy
    from rlhf_ds.utils import is_rank0

    problem = None
    if is_rank0():
        try:
            hold(run_dir)
        except RunDirInUse as e:
            problem = str(e)
    problem = strategy.broadcast_object(problem)
    if problem:
        raise RunDirInUse(problem)


def _in_use_message(path: str, fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        who = f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "its host and pid not written yet"
    return (f"run directory {path} is in use by another job ({who}); one job at a time may write it. Wait for that job "
            "to end or stop it (SIGTERM to that pid saves a checkpoint first), then run the same command to resume; "
            "or use another output_dir")
