"""A real one-host Slurm cluster for tests: munged + slurmctld + slurmd from the distribution's packages.

Everything Slurm writes (state, spool, pid and log files) lives under one temp dir; the daemons are stopped by the
PIDs in their pid files. Only loopback is used.

    cluster = SlurmCluster(tmp_dir, cpus=2).start()
    job = cluster.sbatch(["--ntasks=2", "script.sbatch", "sft", ...], env=...)
    info = cluster.wait(job, timeout=120)       # {'JobState': 'COMPLETED', 'ExitCode': '0:0', ...}
    cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

APT_PACKAGES = ["slurm-wlm", "munge"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (the reason is the message)."""


def apt_install(packages: list[str], timeout: int = 600) -> None:
    """`apt-get update && apt-get install -y ...` (root only); raises SlurmUnavailable with the reason."""
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"not root: cannot apt-get install {' '.join(packages)}")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=180"]  # another apt-get on this host (a parallel session) holds the lock
    for cmd in (["apt-get", *lock, "update"], ["apt-get", *lock, "install", "-y", "--no-install-recommends", *packages]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(cmd)} timed out after {timeout} s") from None
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")


def ensure_slurm_installed() -> None:
    if all(shutil.which(x) for x in ("sbatch", "slurmctld", "slurmd", "scontrol")) and os.path.exists("/usr/sbin/munged"):
        return
    apt_install(APT_PACKAGES)
    if not shutil.which("sbatch"):
        raise SlurmUnavailable("apt-get install slurm-wlm succeeded but sbatch is still missing")


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 2, memory_mb: int = 20000, node: str = "localhost"):
        self.root = os.path.abspath(root)
        # own ports, so that another test cluster on this host (a parallel session) does not collide with this one
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.node = node
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self._munged_started = False

    # ---- config and daemons ----------------------------------------------------------------------------------------
    def write_conf(self) -> str:
        r = self.root
        for sub in ("state", "spool", "log", "run"):
            os.makedirs(os.path.join(r, sub), exist_ok=True)
        lines = [
            "ClusterName=ci",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            # tests poll often: keep the controller's timers short
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=300",
            "KillWait=5",
            f"NodeName={self.node} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return self.conf

    def _run(self, cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def _munge_ok(self) -> bool:
        if not shutil.which("munge"):
            return False
        try:
            enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if enc.returncode != 0:
                return False
            dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
            return dec.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def start(self, timeout: float = 30) -> "SlurmCluster":
        self.write_conf()
        if not self._munge_ok():  # a munged already running on this host is reused (and left alone)
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
            self._munged_started = True
            self._wait_for(self._munge_ok, timeout, "munged")
        self._run(["slurmctld", "-f", self.conf])
        self._run(["slurmd", "-f", self.conf, "-N", self.node])
        self._wait_for(self._node_idle, timeout, "slurmd to register an idle node")
        return self

    def _node_idle(self) -> bool:
        proc = self._run(["sinfo", "-h", "-N", "-o", "%t"], check=False, timeout=10)
        return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

    @staticmethod
    def _wait_for(pred, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}")

    def _pid_files(self) -> list[str]:
        run = os.path.join(self.root, "run")
        files = [os.path.join(run, f) for f in sorted(os.listdir(run))] if os.path.isdir(run) else []
        if self._munged_started:
            files.append("/run/munge/munged.pid")
        return files

    def stop(self, timeout: float = 15) -> None:
        """Cancel what is left, then stop each daemon we started by the PID in its pid file (TERM, then KILL)."""
        if shutil.which("scancel") and os.path.exists(self.conf):
            self._run(["scancel", "--full", "--user=root"], check=False, timeout=10)
        pids = []
        for path in self._pid_files():
            try:
                with open(path, encoding="utf-8") as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                continue
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        log_dir = os.path.join(self.root, "log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-chars:]}")
        return "\n".join(out)

    # ---- jobs ----------------------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        run_env = dict(env or os.environ, SLURM_CONF=self.conf)
        proc = subprocess.run(["sbatch", "--parsable", *args], env=run_env, cwd=cwd, capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (empty when the controller no longer knows the job)."""
        proc = self._run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=10)
        if proc.returncode != 0:
            return {}
        info = {}
        for tok in proc.stdout.split():
            key, sep, val = tok.partition("=")
            if sep and key not in info:
                info[key] = val
        return info

    def wait(self, job_id: str, timeout: float, until=None, poll: float = 1.0) -> dict:
        """Poll `scontrol show job -o` every `poll` s until the job ends (or `until(info)` holds); the last info."""
        until = until or (lambda i: i.get("JobState") in TERMINAL_STATES)
        deadline = time.time() + timeout
        info: dict = {}
        while time.time() < deadline:
            info = self.job_info(job_id)
            if info and until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not done after {timeout} s; last state: {info}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
