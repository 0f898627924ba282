"""A private sshd on 127.0.0.1 for pdsh tests: its own host key, client key, port, pid file — nothing in ~/.ssh changes.

    sshd = LocalSshd(tmp_dir).start()
    env.update(sshd.client_env())   # PDSH_SSH_ARGS_APPEND: port, key, no host-key prompts
    ...
    sshd.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from slurm_cluster import SlurmUnavailable, apt_install


def ensure_ssh_tools() -> None:
    if not (shutil.which("pdsh") and os.path.exists("/usr/sbin/sshd") and shutil.which("ssh-keygen")):
        try:
            apt_install(["openssh-server", "openssh-client", "pdsh"])
        except SlurmUnavailable as e:  # same failure modes as for Slurm: not root, no apt, apt failed
            raise RuntimeError(str(e)) from None


class LocalSshd:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.key = os.path.join(self.root, "client_key")
        self.pid_file = os.path.join(self.root, "sshd.pid")

    def start(self, timeout: float = 15) -> "LocalSshd":
        host_key = os.path.join(self.root, "host_key")
        for k in (self.key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], check=True, timeout=30)
        auth = os.path.join(self.root, "authorized_keys")
        shutil.copy(self.key + ".pub", auth)
        os.chmod(auth, 0o600)
        conf = os.path.join(self.root, "sshd_config")
        with open(conf, "w", encoding="utf-8") as f:
            f.write("\n".join([f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
                               f"AuthorizedKeysFile {auth}", f"PidFile {self.pid_file}", "UsePAM no",
                               "StrictModes no", "PermitRootLogin prohibit-password", "PasswordAuthentication no"])
                    + "\n")
        os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir sshd insists on
        subprocess.run(["/usr/sbin/sshd", "-f", conf, "-E", os.path.join(self.root, "sshd.log")], check=True,
                       timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            probe = subprocess.run(["ssh", *self.ssh_options(), "127.0.0.1", "true"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"sshd on port {self.port} not reachable: {probe.stderr.decode(errors='replace')}")

    def ssh_options(self) -> list[str]:
        return ["-p", str(self.port), "-i", self.key, "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]

    def client_env(self) -> dict:
        """What pdsh's ssh module appends to every ssh it runs."""
        return {"PDSH_SSH_ARGS_APPEND": " ".join(self.ssh_options())}

    def stop(self) -> None:
        try:
            with open(self.pid_file, encoding="utf-8") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
