"""Launching: the scripts in launch/ (syntax, lint, the commands and rank mappings they derive), two fake nodes on one
machine through the deepspeed launcher, a real one-host Slurm cluster (training, preemption and requeue), and the
Dockerfile's structure.

Slurm and shellcheck are installed with apt-get when missing (root only); the tests that need them skip otherwise.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO, cli_env, free_port, read_metrics

sys.path.insert(0, os.path.join(REPO, "tests", "cluster"))
import slurm_cluster  # noqa: E402

LAUNCH = os.path.join(REPO, "launch")
CLUSTER = os.path.join(REPO, "tests", "cluster")
CPUS = len(os.sched_getaffinity(0))  # what `nproc` reports
SCRIPTS = ["single_node.sh", "multi_node_hostfile.sh", "multi_node_no_ssh.sh", "slurm.sbatch"]
# a few optimizer steps of ZeRO-3 SFT on the tiny model: what the multi-process tests train
SFT_FEW_STEPS = ["train.max_steps=3", "train.micro_batch_size=4", "train.eval_batch_size=16", "engine.zero_stage=3"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers (reusable by other steps' tests: pass any `rlhf_ds.cli` arguments)
# ---------------------------------------------------------------------------------------------------------------------
def run_fake_nodes(step_args: list[str], nodes: int = 2, slots: int = 1, timeout: int = 300,
                   env: dict | None = None) -> list[dict]:
    """Emulate `nodes` machines on this one: one `deepspeed --no_ssh --node_rank N` launcher per fake node, started
    together, sharing a hostfile of distinct labels (`slots` ranks each) and a 127.0.0.1 rendezvous.

    Returns one dict per node: {"returncode", "output"}; raises AssertionError (with every node's output) when a node
    fails or the run exceeds `timeout` seconds (all launchers are then killed)."""
    work = tempfile.mkdtemp(prefix="fake-nodes-")
    hostfile = os.path.join(work, "hostfile")
    with open(hostfile, "w", encoding="utf-8") as f:
        f.write("".join(f"fake-node-{i} slots={slots}\n" for i in range(nodes)))
    port = free_port()
    run_env = env or cli_env(threads=1)
    procs, logs = [], []
    try:
        for node in range(nodes):
            log = open(os.path.join(work, f"node{node}.log"), "w+", encoding="utf-8")
            logs.append(log)
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "-H", hostfile, "--no_ssh",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "--no_local_rank", "--module", "rlhf_ds.cli", *step_args]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.time() + timeout
        while time.time() < deadline and any(p.poll() is None for p in procs):
            # one node failing leaves the others waiting at the rendezvous: stop early
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        timed_out = any(p.poll() is None for p in procs)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        results = []
        for p, log in zip(procs, logs):
            log.seek(0)
            results.append({"returncode": p.returncode, "output": log.read()})
            log.close()
        shutil.rmtree(work, ignore_errors=True)
    if timed_out or any(r["returncode"] != 0 for r in results):
        detail = "\n".join(f"--- node {i} (exit {r['returncode']})\n{r['output'][-5000:]}" for i, r in enumerate(results))
        raise AssertionError(f"fake-node run {'timed out' if timed_out else 'failed'}: {step_args}\n{detail}")
    return results


SCRIPT_KNOBS = {"NUM_GPUS", "CONFIG", "MASTER_ADDR", "MASTER_PORT", "DEEPSPEED", "PYTHON", "ENTRY_MODULE",
                "LAUNCH_MODE", "GPUS_PER_NODE", "HOSTFILE", "NODE_RANK", "FORWARD_VARS", "DRY_RUN", "SRUN_EXTRA_ARGS",
                "RLHF_DS_HOME", "PREEMPT_EXIT_CODE", "MAX_RESTARTS", "RLHF_DS_THREADS", "LOCAL_RANKS"}


def run_script(name: str, *args: str, env_extra: dict | None = None, unset: tuple = (),
               check: bool = True) -> subprocess.CompletedProcess:
    # the scripts' own knobs and any SLURM_* of a job this suite might run in are not inherited
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_KNOBS and not k.startswith("SLURM_")}
    for k in unset:
        env.pop(k, None)
    env.update(env_extra or {})
    proc = subprocess.run(["bash", os.path.join(LAUNCH, name), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _apt_installable(package: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-cache"):
        return False
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return bool(m and m.group(1) != "(none)")


# ---------------------------------------------------------------------------------------------------------------------
# Scripts: syntax, lint, documented headers
# ---------------------------------------------------------------------------------------------------------------------
def test_scripts_parse_and_are_documented():
    for name in SCRIPTS:
        path = os.path.join(LAUNCH, name)
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {name}: {proc.stderr}"
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith("#!"), f"{name}: no shebang"
        header = text.split("\nset -euo pipefail")[0]
        assert "Usage" in header and "Variables to edit" in header, f"{name}: header must say how to use and edit it"
        assert "--master_addr" in text, f"{name}: must pass --master_addr explicitly"
        assert "OMP_NUM_THREADS" in text, f"{name}: must set CPU threads per rank"
        assert "DRY_RUN" in text
    with open(os.path.join(LAUNCH, "hostfile"), encoding="utf-8") as f:
        hosts = [line.split() for line in f if line.strip() and not line.startswith("#")]
    assert len(hosts) >= 2 and all(re.fullmatch(r"slots=\d+", h[1]) for h in hosts)
    assert len({h[0] for h in hosts}) == len(hosts)


@pytest.fixture(scope="session")
def shellcheck() -> str:
    exe = shutil.which("shellcheck")
    if exe:
        return exe
    if not _apt_installable("shellcheck"):
        pytest.skip("shellcheck not installed and apt-cache has no candidate for it (or not root)")
    try:
        slurm_cluster.apt_install(["shellcheck"])
    except slurm_cluster.SlurmUnavailable as e:
        pytest.skip(f"could not install shellcheck: {e}")
    exe = shutil.which("shellcheck")
    if not exe:
        pytest.skip("shellcheck still missing after apt-get install")
    return exe


def test_shellcheck_clean(shellcheck):
    paths = [os.path.join(LAUNCH, n) for n in SCRIPTS] + [os.path.join(CLUSTER, "fake_bin", "scontrol")]
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *paths], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# What the scripts would run (DRY_RUN=1): fast checks of the derivation logic
# ---------------------------------------------------------------------------------------------------------------------
def test_single_node_command():
    out = run_script("single_node.sh", env_extra={"DRY_RUN": "1", "NUM_GPUS": "2", "MASTER_PORT": "29777",
                                                  "DEEPSPEED": "deepspeed"}, unset=("OMP_NUM_THREADS",)).stdout
    threads = max(1, CPUS // 2)
    assert out.strip() == (f"OMP_NUM_THREADS={threads} python -m rlhf_ds.engine.launcher --ranks 2 -- deepspeed "
                           "--num_gpus 2 --master_addr 127.0.0.1 --master_port 29777 --no_local_rank --module "
                           "rlhf_ds.cli sft")  # under the supervisor: a killed launcher or rank is never status 0
    out = run_script("single_node.sh", "pretrain", "output_dir=/x y", env_extra={
        "DRY_RUN": "1", "NUM_GPUS": "1", "CONFIG": "run.yaml", "OMP_NUM_THREADS": "3"}).stdout
    assert out.startswith("OMP_NUM_THREADS=3 ")
    assert out.rstrip().endswith("--module rlhf_ds.cli pretrain --config run.yaml output_dir=/x y")


def test_multi_node_hostfile_command(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("# comment\n\ngpu-a slots=4  # first\ngpu-b slots=4\n")
    out = run_script("multi_node_hostfile.sh", "sft", "model=m", env_extra={
        "DRY_RUN": "1", "HOSTFILE": str(hostfile), "DEEPSPEED": "deepspeed", "WANDB_API_KEY": "secret123",
        "HOME": str(tmp_path)}, unset=("OMP_NUM_THREADS", "RLHF_DS_THREADS")).stdout
    lines = out.strip().splitlines()
    threads = max(1, CPUS // 4)
    assert f"env: OMP_NUM_THREADS={threads}" in lines and f"env: RLHF_DS_THREADS={threads}" in lines
    assert "env: WANDB_API_KEY=***" in lines and "secret123" not in out  # forwarded, never printed
    assert "env: RLHF_DS_END_WITH_SSH=1" in lines  # remote ranks end with their ssh session
    assert lines[-1] == (f"python -m rlhf_ds.engine.launcher --ranks 0 -- deepspeed --hostfile {hostfile} --launcher "
                         "pdsh --master_addr gpu-a --master_port 29500 --no_local_rank --module rlhf_ds.cli sft model=m")


def test_multi_node_no_ssh_command(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("n0 slots=2\nn1 slots=1\n")
    base = {"DRY_RUN": "1", "HOSTFILE": str(hostfile), "DEEPSPEED": "deepspeed", "MASTER_PORT": "29123"}
    out = run_script("multi_node_no_ssh.sh", "sft", env_extra={**base, "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5"},
                     unset=("OMP_NUM_THREADS",)).stdout
    assert out.strip() == (f"OMP_NUM_THREADS={CPUS} python -m rlhf_ds.engine.launcher --ranks 1 -- deepspeed "
                           f"--hostfile {hostfile} --no_ssh --node_rank 1 --master_addr 10.0.0.5 --master_port 29123 "
                           "--no_local_rank --module rlhf_ds.cli sft")
    out = run_script("multi_node_no_ssh.sh", env_extra={**base, "NODE_RANK": "0"}).stdout
    assert "--node_rank 0 --master_addr n0 " in out  # default master: the hostfile's first node
    bad = run_script("multi_node_no_ssh.sh", env_extra={**base, "NODE_RANK": "2"}, check=False)
    assert bad.returncode == 2 and "has 2 node(s)" in bad.stderr
    hostfile.write_text("somewhere-else slots=1\n")
    bad = run_script("multi_node_no_ssh.sh", env_extra={"DRY_RUN": "1", "HOSTFILE": str(hostfile)},
                     unset=("NODE_RANK",), check=False)
    assert bad.returncode == 2 and "set NODE_RANK" in bad.stderr


def _sbatch_dry_run(extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {"DRY_RUN": "1", "PATH": os.path.join(CLUSTER, "fake_bin") + os.pathsep + os.environ["PATH"], **extra}
    return run_script("slurm.sbatch", *args, env_extra=env,
                      unset=("OMP_NUM_THREADS",), check=False)


def _task_lines(out: str) -> dict[int, dict]:
    tasks = {}
    for line in out.splitlines():
        m = re.match(r"task (\d+): (.*) :: (.*)$", line)
        if m:
            env = dict(kv.split("=", 1) for kv in m.group(2).split())
            tasks[int(m.group(1))] = {**env, "cmd": m.group(3)}
    return tasks


def test_slurm_env_mapping_tasks_mode():
    """One task per rank: 2 fake nodes x 3 tasks; RANK/LOCAL_RANK/WORLD_SIZE/NODE_RANK from SLURM_*, the master address
    from the first node's NodeAddr, the port from the job id, threads from --cpus-per-task."""
    proc = _sbatch_dry_run({"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08]", "FAKE_HOSTNAMES": "gpu07 gpu08",
                            "FAKE_NODEADDR_gpu07": "10.1.2.7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "6",
                            "SLURM_TASKS_PER_NODE": "3(x2)", "SLURM_CPUS_PER_TASK": "5", "SLURM_CPUS_ON_NODE": "16"},
                           "sft", "output_dir=runs/x")
    assert proc.returncode == 0, proc.stderr
    assert "mode tasks" in proc.stdout
    assert re.search(r"^srun --kill-on-bad-exit=1 --nodes=2 --ntasks=6 --cpus-per-task=5 ", proc.stdout, re.M)
    tasks = _task_lines(proc.stdout)
    assert sorted(tasks) == list(range(6))
    for r, t in tasks.items():
        assert (t["RANK"], t["LOCAL_RANK"], t["NODE_RANK"]) == (str(r), str(r % 3), str(r // 3))
        assert (t["WORLD_SIZE"], t["LOCAL_WORLD_SIZE"]) == ("6", "3")
        assert (t["MASTER_ADDR"], t["MASTER_PORT"]) == ("10.1.2.7", str(20000 + 1234 % 20000))
        assert t["OMP_NUM_THREADS"] == "5"
        assert t["cmd"] == "python -u -m rlhf_ds.cli sft output_dir=runs/x"


def test_slurm_env_mapping_uneven_nodes_and_launcher_mode():
    # uneven block distribution "2,1": ranks 0-1 on node 0, rank 2 on node 1; threads = CPUs on node / local tasks
    proc = _sbatch_dry_run({"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "a,b", "FAKE_HOSTNAMES": "a b",
                            "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1",
                            "SLURM_CPUS_ON_NODE": "8", "MASTER_PORT": "30001"})
    assert proc.returncode == 0, proc.stderr
    tasks = _task_lines(proc.stdout)
    assert [(t["RANK"], t["LOCAL_RANK"], t["NODE_RANK"], t["LOCAL_WORLD_SIZE"], t["OMP_NUM_THREADS"])
            for t in tasks.values()] == [("0", "0", "0", "2", "4"), ("1", "1", "0", "2", "4"), ("2", "0", "1", "1", "8")]
    assert all(t["MASTER_ADDR"] == "10.9.0.1" and t["MASTER_PORT"] == "30001" for t in tasks.values())
    assert all(t["cmd"] == "python -u -m rlhf_ds.cli sft" for t in tasks.values())  # default step

    # one task per node -> one deepspeed --no_ssh launcher per node with GPUS_PER_NODE ranks
    proc = _sbatch_dry_run({"SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "n[1-3]", "FAKE_HOSTNAMES": "n1 n2 n3",
                            "FAKE_NODEADDR_n1": "192.168.5.1", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "3",
                            "SLURM_TASKS_PER_NODE": "1(x3)", "SLURM_CPUS_ON_NODE": "32", "SLURM_GPUS_ON_NODE": "8",
                            "CONFIG": "ppo.yaml"}, "ppo", "output_dir=/shared/ppo")
    assert proc.returncode == 0, proc.stderr
    assert "mode launcher" in proc.stdout
    assert re.search(r"^srun --kill-on-bad-exit=1 --nodes=3 --ntasks=3 --ntasks-per-node=1 ", proc.stdout, re.M)
    tasks = _task_lines(proc.stdout)
    assert sorted(tasks) == [0, 1, 2]
    for r, t in tasks.items():
        assert (t["NODE_RANK"], t["LOCAL_RANKS"], t["WORLD_SIZE"], t["OMP_NUM_THREADS"]) == (str(r), "8", "24", "4")
        assert t["cmd"] == (f"deepspeed --hostfile /dev/null --no_ssh --node_rank {r} --master_addr 192.168.5.1 "
                            "--master_port 20099 --no_local_rank --module rlhf_ds.cli ppo --config ppo.yaml "
                            "output_dir=/shared/ppo")


def test_slurm_script_header_and_guards():
    with open(os.path.join(LAUNCH, "slurm.sbatch"), encoding="utf-8") as f:
        text = f.read()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    assert "--requeue" in directives
    sig = [d for d in directives if d.startswith("--signal=")]
    assert len(sig) == 1 and re.fullmatch(r"--signal=USR1@\d+", sig[0]), sig
    assert any(d.startswith("--time=") for d in directives)
    assert re.search(r"PREEMPT_EXIT_CODE=\$\{PREEMPT_EXIT_CODE:-75\}", text)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    outside = run_script("slurm.sbatch", env_extra={"DRY_RUN": "1"}, unset=("SLURM_JOB_ID",), check=False)
    assert outside.returncode == 2 and "not inside a Slurm job" in outside.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Two fake nodes through the real deepspeed launcher
# ---------------------------------------------------------------------------------------------------------------------
def test_two_fake_nodes_zero3_sft(tiny_base, tmp_path):
    out = str(tmp_path / "sft")
    nodes = run_fake_nodes(["sft", f"output_dir={out}", f"model={tiny_base}", *SFT_FEW_STEPS])

    # each launcher started one rank of a world of two
    for node in nodes:
        assert "dist_world_size=2" in node["output"], node["output"][-3000:]
    # shared outputs exist once, written by global rank 0 only
    entries = sorted(os.listdir(out))
    for name in ("config.yaml", "metrics.jsonl", "results.json", "model", "logs"):
        assert name in entries
    assert not [e for e in entries if e.startswith(".tmp-") or e.startswith(".old-")], entries
    assert sorted(os.listdir(os.path.join(out, "logs"))) == ["rank0.log", "rank1.log"]
    assert os.path.exists(os.path.join(out, "model", "config.json"))
    rows = read_metrics(out)
    keys = [json.dumps({k: v for k, v in r.items() if k != "time"}, sort_keys=True) for r in rows]
    assert rows and len(keys) == len(set(keys)), f"duplicated metrics lines (more than one writer): {rows}"
    assert sum("sft/loss" in r for r in rows) == 1  # one training row at step 3 (log_every=5 > max_steps)
    assert "== sft summary ==" in nodes[0]["output"] and "== sft summary ==" not in nodes[1]["output"]
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["steps"] == 3 and math.isfinite(results["eval_loss"])
    for r in (0, 1):
        with open(os.path.join(out, "logs", f"rank{r}.log"), encoding="utf-8") as f:
            log = f.read()
        assert f"[rank{r}]" in log and "world size 2" in log, log[:2000]


@pytest.mark.skipif(os.environ.get("RLHF_DS_TEST_PDSH") != "1",
                    reason="opt-in (RLHF_DS_TEST_PDSH=1): installs openssh-server/pdsh and starts a private sshd")
def test_multi_node_hostfile_over_pdsh(tiny_base, tmp_path):
    """launch/multi_node_hostfile.sh for real: deepspeed --launcher pdsh over ssh to two names of this machine
    (localhost, 127.0.0.1), the env file reaching the remote ranks."""
    import ssh_localhost

    try:
        ssh_localhost.ensure_ssh_tools()
    except RuntimeError as e:
        pytest.skip(f"ssh/pdsh unavailable: {e}")
    sshd = ssh_localhost.LocalSshd(str(tmp_path / "ssh")).start()
    try:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        out = str(tmp_path / "sft")
        env = {**cli_env(threads=1), **sshd.client_env(), "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "LAUNCHER_ARGS": "--no_ssh_check", "TORCH_DISTRIBUTED_DEBUG": "OFF"}
        proc = subprocess.run(["bash", os.path.join(LAUNCH, "multi_node_hostfile.sh"), "sft", f"output_dir={out}",
                               f"model={tiny_base}", *SFT_FEW_STEPS], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        sshd.stop()
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert re.search(r"pdsh .*-w localhost,127\.0\.0\.1 .*export OMP_NUM_THREADS=1; .*export TORCH_DISTRIBUTED_DEBUG=OFF;",
                     text), text[-3000:]
    assert "localhost: " in text and "127.0.0.1: " in text  # pdsh's per-host prefixes: ranks ran on both "nodes"
    assert sorted(os.listdir(os.path.join(out, "logs"))) == ["rank0.log", "rank1.log"]
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        assert math.isfinite(json.load(f)["eval_loss"])


PDSH_OPT_IN = pytest.mark.skipif(os.environ.get("RLHF_DS_TEST_PDSH") != "1",
                                 reason="opt-in (RLHF_DS_TEST_PDSH=1): installs openssh-server/pdsh and starts a "
                                        "private sshd")
PDSH_EXIT_WITHIN_S = 60  # the script's status after a launcher process is killed
PDSH_GONE_WITHIN_S = 10  # then: no process of the run left on either "node"


@pytest.fixture
def local_sshd(tmp_path):
    """A private sshd on 127.0.0.1 (tests/cluster/ssh_localhost.py), stopped after the test."""
    import ssh_localhost

    try:
        ssh_localhost.ensure_ssh_tools()
    except RuntimeError as e:
        pytest.skip(f"ssh/pdsh unavailable: {e}")
    sshd = ssh_localhost.LocalSshd(str(tmp_path / "ssh")).start()
    try:
        yield sshd
    finally:
        sshd.stop()


@pytest.fixture(scope="module")
def pdsh_models(tmp_path_factory) -> dict[str, str]:
    from dist_hybrid_models import tiny_models

    return tiny_models(tmp_path_factory)


def processes_of_run(run_dir: str) -> list:
    """Every live process whose command line names `run_dir`: the supervisor, DeepSpeed's runner, pdsh, its ssh
    clients, the remote shells, launch.py and the ranks (not the sshd sessions: their command line is `sshd: ...`)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(run_dir in a for a in p.info["cmdline"] or ()):
            found.append(p)
    return found


def _describe(processes: list) -> str:
    import psutil

    lines = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:200]}")
    return "\n".join(lines)


def _start_pdsh_script(sshd, hostfile: str, args: list[str], log_path: str) -> tuple:
    env = {**cli_env(threads=1), **sshd.client_env(), "HOSTFILE": hostfile, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LAUNCHER_ARGS": "--no_ssh_check", "TORCH_DISTRIBUTED_DEBUG": "OFF"}
    log = open(log_path, "w", encoding="utf-8")  # a file, not a pipe: nothing upstream of pdsh may block on output
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "multi_node_hostfile.sh"), *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, log


def _is_rank(p) -> bool:
    import psutil

    try:
        return "RANK" in p.environ() and "rlhf_ds.cli" in p.cmdline()
    except psutil.Error:
        return False


def _read_log(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@PDSH_OPT_IN
@pytest.mark.parametrize("victim", ["runner", "pdsh"])
def test_kill9_of_the_pdsh_launch_leaves_no_process_and_the_rerun_resumes(pdsh_models, local_sshd, tmp_path,
                                                                          victim):
    """issue #16 in pdsh mode: launch/multi_node_hostfile.sh runs 2-rank PPO over ssh to localhost and 127.0.0.1;
    `kill -9` of DeepSpeed's runner (or of pdsh) must end the script with a non-zero status, leave no rank, launch.py,
    pdsh or ssh process of the run, keep the newest checkpoint complete, and the same command must resume."""
    import psutil

    from conftest import PPO_RESUME_STEPS, ppo_metrics_by_step, ppo_resume_args
    from test_resume import checkpoints

    from rlhf_ds.checkpoint import checkpoint_problem

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = str(tmp_path / "ppo")
    args = ppo_resume_args(pdsh_models, out, "checkpoint.every_steps=1")
    log_path = str(tmp_path / "launch.log")
    proc, log = _start_pdsh_script(local_sshd, str(hostfile), args, log_path)
    try:
        # both ranks up (one per "node", each under its own ssh session) and 2 PPO steps done (checkpoints saved)
        deadline = time.time() + 400
        ranks = []
        while time.time() < deadline:
            assert proc.poll() is None, f"run ended (exit {proc.returncode}):\n{_read_log(log_path)[-4000:]}"
            ranks = [p for p in processes_of_run(out) if _is_rank(p)]
            metrics = os.path.join(out, "metrics.jsonl")
            done = os.path.exists(metrics) and any(r.get("step", 0) >= 2 and "ppo/kl" in r for r in read_metrics(out))
            if len(ranks) == 2 and done:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"2 ranks at step 2 not reached:\n{_describe(processes_of_run(out))}\n"
                                 f"{_read_log(log_path)[-4000:]}")
        assert sorted(r.environ()["RANK"] for r in ranks) == ["0", "1"]
        supervisor = psutil.Process(proc.pid).children()[0]
        assert "rlhf_ds.engine.launcher" in supervisor.cmdline()
        runner = supervisor.children()[0]
        pdsh = next(p for p in runner.children() if p.name().startswith("pdsh"))  # Debian: pdsh.bin, argv[0] pdsh
        before = processes_of_run(out)
        assert {p.pid for p in ranks} < {p.pid for p in before}
        with open(local_sshd.pid_file, encoding="utf-8") as f:
            sessions = psutil.Process(int(f.read())).children(recursive=True)
        assert sessions, "no ssh session to the private sshd"

        target = {"runner": runner, "pdsh": pdsh}[victim]
        t0 = time.time()
        target.kill()
        try:
            rc = proc.wait(timeout=PDSH_EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the script still runs {PDSH_EXIT_WITHIN_S} s after kill -9 {victim}:\n"
                                 f"{_describe(processes_of_run(out))}") from None
        exited = time.time() - t0
        ranks_gone = everything_gone = None
        while time.time() - t0 < exited + PDSH_GONE_WITHIN_S:
            left = processes_of_run(out)
            if ranks_gone is None and not [p for p in ranks if p in left]:
                ranks_gone = time.time() - t0
            if not left and not [s for s in sessions if s.is_running() and s.status() != psutil.STATUS_ZOMBIE]:
                everything_gone = time.time() - t0
                break
            time.sleep(0.05)
        text = _read_log(log_path)
        print(f"pdsh mode, kill -9 {victim}: exit status {rc} after {exited:.2f} s; no rank left after "
              f"{ranks_gone if ranks_gone is None else round(ranks_gone, 2)} s; no process of the run (nor ssh "
              f"session) after {everything_gone if everything_gone is None else round(everything_gone, 2)} s")
        assert everything_gone is not None, (f"{PDSH_GONE_WITHIN_S} s after the script's exit:\n"
                                             f"{_describe(processes_of_run(out))}\n{text[-3000:]}")
        assert rc != 0, text[-4000:]
        if victim == "runner":
            assert rc == 137 and "was killed by SIGKILL; exit status 137" in text, text[-3000:]
        else:  # DeepSpeed's runner exits 0 when pdsh dies of a signal; the ssh clients it leaves give it away
            assert rc == 1 and "left ssh" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for p in processes_of_run(out):  # never leave a run behind, whatever failed
            with contextlib.suppress(psutil.Error):
                p.kill()

    saved = checkpoints(out)
    assert saved and checkpoint_problem(os.path.join(out, "checkpoints", saved[-1])) is None, saved
    time.sleep(1)
    assert checkpoints(out) == saved  # nobody trains on

    # the same command: no stale run-directory lock, resumes from the newest checkpoint and finishes
    rerun_log = str(tmp_path / "rerun.log")
    proc, log = _start_pdsh_script(local_sshd, str(hostfile), args, rerun_log)
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = _read_log(rerun_log)
    assert rc == 0, text[-5000:]
    assert f"resuming from checkpoint {os.path.join(out, 'checkpoints', saved[-1])}" in text, text[-3000:]
    assert sorted(ppo_metrics_by_step(out)) == list(range(1, PPO_RESUME_STEPS + 1))
    assert not processes_of_run(out)


# ---------------------------------------------------------------------------------------------------------------------
# A real Slurm cluster (one host, 2 CPUs)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        slurm_cluster.ensure_slurm_installed()
    except slurm_cluster.SlurmUnavailable as e:
        pytest.skip(f"Slurm unavailable: {e}")
    cluster = slurm_cluster.SlurmCluster(str(tmp_path_factory.mktemp("slurm")), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _job_env(**extra) -> dict:
    env = cli_env(threads=1)
    for k in ("OMP_NUM_THREADS", "RLHF_DS_THREADS", "MASTER_ADDR", "MASTER_PORT", "LAUNCH_MODE", "GPUS_PER_NODE"):
        env.pop(k, None)  # the script derives them
    env.update(PYTHON=sys.executable, DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner")
    env.update(extra)
    return env


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_slurm_sbatch_zero3_sft(slurm, tiny_base, tmp_path):
    out = str(tmp_path / "sft")
    job_out = str(tmp_path / "job-%j.out")
    job = slurm.sbatch(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5", f"--output={job_out}",
                        os.path.join(LAUNCH, "slurm.sbatch"), "sft", f"output_dir={out}", f"model={tiny_base}",
                        *SFT_FEW_STEPS], env=_job_env(), cwd=REPO)
    log_path = job_out.replace("%j", job)
    try:
        info = slurm.wait(job, timeout=240)
    except TimeoutError:
        subprocess.run(["scancel", job], env=slurm.env, timeout=10)
        raise
    log = _read(log_path) if os.path.exists(log_path) else "(no job output)"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log[-5000:]}\n{slurm.log_tail()}"
    assert info.get("Requeue") == "1"  # from the script's #SBATCH --requeue
    assert "mode tasks" in log
    for r in (0, 1):
        assert re.search(rf"task {r}: RANK={r} LOCAL_RANK={r} WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 NODE_RANK=0 "
                         rf"MASTER_ADDR=\S+ MASTER_PORT=\d+ OMP_NUM_THREADS=1$", log, re.M), log[-3000:]
        assert "world size 2" in _read(os.path.join(out, "logs", f"rank{r}.log"))
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["steps"] == 3 and math.isfinite(results["eval_loss"])


@pytest.mark.parametrize("mode", ["tasks", "launcher"])
def test_slurm_preemption_requeues_and_resumes(slurm, tmp_path, mode):
    """SIGUSR1 to the job's steps (what --signal=USR1@120 does before the time limit) reaches the ranks, also through
    the deepspeed launcher; they exit 75 ("checkpoint saved"), the script requeues the job, and the restarted job
    (SLURM_RESTART_COUNT=1) runs the same command, which finishes."""
    out = str(tmp_path / "run")
    job_out = str(tmp_path / "job-%j.out")
    if mode == "tasks":
        layout = ["--ntasks-per-node=2", "--cpus-per-task=1"]
    else:  # one task on the node, which starts 2 ranks with deepspeed --no_ssh
        layout = ["--ntasks-per-node=1", "--cpus-per-task=2"]
    env = _job_env(ENTRY_MODULE="fake_step", GPUS_PER_NODE="2")
    env["PYTHONPATH"] = CLUSTER + os.pathsep + env["PYTHONPATH"]
    job = slurm.sbatch(["--nodes=1", *layout, "--time=4", f"--output={job_out}", os.path.join(LAUNCH, "slurm.sbatch"),
                        "fake", f"output_dir={out}"], env=env, cwd=REPO)
    log_path = job_out.replace("%j", job)

    def job_log() -> str:
        return _read(log_path)[-4000:] if os.path.exists(log_path) else "(no job output)"

    try:
        deadline = time.time() + 90
        while not all(os.path.exists(os.path.join(out, f"ready.{r}")) for r in (0, 1)):
            info = slurm.job_info(job)
            assert time.time() < deadline and info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
                f"ranks never got ready: {info}\n{job_log()}"
            time.sleep(0.2)
        info = preempt_and_wait_for_requeued_run(slurm, job, job_log)
        for r in (0, 1):
            assert os.path.exists(os.path.join(out, f"preempted.{r}")), f"rank {r} never got SIGUSR1\n{job_log()}"
    except BaseException:
        subprocess.run(["scancel", job], env=slurm.env, timeout=10)
        raise
    log = job_log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{info}\n{log}"
    assert f"mode {mode}" in log
    assert "requeueing job" in log and "exit status 0" in log
    for r in (0, 1):
        assert os.path.exists(os.path.join(out, f"resumed.{r}"))
    starts = [line for line in _read(os.path.join(out, "events.log")).splitlines() if line.startswith("start")]
    assert sorted(re.sub(r" master=\S+", "", s) for s in starts) == [
        "start rank=0 world=2 restart=0", "start rank=0 world=2 restart=1",
        "start rank=1 world=2 restart=0", "start rank=1 world=2 restart=1"]


def preempt_and_wait_for_requeued_run(slurm, job: str, job_log, timeout: float = 90) -> dict:
    """`scancel --signal=USR1` (what --signal=USR1@120 does before the time limit), then wait until the script has
    requeued the job and the requeued run has ended; returns the final job info."""
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm.env, check=True, timeout=10)
    info = slurm.wait(job, timeout=120, poll=0.5, until=lambda i: i.get("Restarts", "0") != "0"
                      or i.get("JobState") in slurm_cluster.TERMINAL_STATES)
    assert info.get("Restarts") == "1", f"not requeued: {info}\n{job_log()}"

    # A requeued job waits out a begin-time delay (~2 min, set once its first run has ended): bring it forward to
    # a few seconds from now. Not to "now": slurmd refuses a job whose credential it revoked in the same second.
    def released_or_done(i: dict) -> bool:
        if i.get("JobState") == "PENDING" and i.get("Reason") == "BeginTime":
            eligible = datetime.datetime.strptime(i["EligibleTime"], "%Y-%m-%dT%H:%M:%S")
            if eligible - datetime.datetime.now() > datetime.timedelta(seconds=10):
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=slurm.env, timeout=10)
        return i.get("JobState") in slurm_cluster.TERMINAL_STATES

    return slurm.wait(job, timeout=timeout, until=released_or_done)


def test_slurm_preemption_of_real_ppo_resumes_exactly(slurm, ppo_reference, tmp_path_factory, tmp_path):
    """The whole flow with the real step: PPO on 2 Slurm tasks (ZeRO-3), `scancel --signal=USR1` after step 2; every
    rank finishes its step, saves, exits 75; the script requeues; the requeued job resumes from the checkpoint and
    its per-step metrics equal those of the uninterrupted run."""
    from dist_hybrid_models import tiny_models

    from conftest import ppo_metrics_by_step, ppo_resume_args

    models = tiny_models(tmp_path_factory)
    out = str(tmp_path / "ppo")
    job_out = str(tmp_path / "job-%j.out")
    job = slurm.sbatch(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=8", f"--output={job_out}",
                        os.path.join(LAUNCH, "slurm.sbatch"), *ppo_resume_args(models, out)], env=_job_env(), cwd=REPO)
    log_path = job_out.replace("%j", job)

    def job_log() -> str:
        return _read(log_path)[-5000:] if os.path.exists(log_path) else "(no job output)"

    try:
        deadline = time.time() + 240
        while not (os.path.exists(os.path.join(out, "metrics.jsonl"))
                   and any(r.get("step", 0) >= 2 and "ppo/kl" in r for r in read_metrics(out))):
            info = slurm.job_info(job)
            assert time.time() < deadline and info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
                f"PPO never reached step 2: {info}\n{job_log()}"
            time.sleep(0.3)
        info = preempt_and_wait_for_requeued_run(slurm, job, job_log, timeout=300)
    except BaseException:
        subprocess.run(["scancel", job], env=slurm.env, timeout=10)
        raise
    log = _read(log_path)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{info}\n{log[-5000:]}"
    assert "stopped by SIGUSR1 after step" in log and "requeueing job" in log
    assert re.search(r"resuming from checkpoint \S+/checkpoints/step_\d{8}", log), log[-5000:]
    ref, got = ppo_metrics_by_step(ppo_reference), ppo_metrics_by_step(out)
    assert got == ref


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfile (no Docker engine here: a structural check)
# ---------------------------------------------------------------------------------------------------------------------
def parse_dockerfile(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, current = [], ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if current and line.lstrip().startswith("#"):
                continue  # comment inside a continued instruction
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), " ".join(rest.split())))
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def test_dockerfile_structure():
    docker = os.path.join(REPO, "docker")
    ins = parse_dockerfile(os.path.join(docker, "Dockerfile"))
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL",
             "SHELL", "HEALTHCHECK", "VOLUME", "STOPSIGNAL", "ONBUILD"}
    assert all(word in known for word, _ in ins), [w for w, _ in ins if w not in known]

    # FROM: the first instruction, an official CUDA PyTorch image, pinned tag (no `latest`, no bare name)
    froms = [args for word, args in ins if word == "FROM"]
    assert ins[0][0] == "FROM" and len(froms) == 1
    image = froms[0].split()[0]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-(devel|runtime)", image)
    assert m, f"base image must be a pinned pytorch/pytorch CUDA tag, got {image}"
    assert "latest" not in image

    runs = " && ".join(args for word, args in ins if word == "RUN")
    # torch comes from the base image only
    for cmd in re.findall(r"pip[0-9.]* install[^&;|]*", runs):
        assert not re.search(r"(^|\s)torch($|[\s=<>~!\[])", cmd), f"reinstalls torch: {cmd}"
    assert "-c /tmp/torch-constraint.txt" in runs
    # ssh and pdsh for the multi-node launcher
    apt = " ".join(re.findall(r"apt-get install[^&;|]*", runs))
    for pkg in ("openssh-server", "openssh-client", "pdsh"):
        assert re.search(rf"(^|\s){pkg}(\s|$)", apt), f"{pkg} not installed"
    assert "rm -rf /var/lib/apt/lists/*" in runs
    # a WORKDIR any user can work in (not under /root), made writable
    workdirs = [args for word, args in ins if word == "WORKDIR"]
    assert workdirs and all(w.startswith("/") and not w.startswith("/root") for w in workdirs)
    assert "chmod -R a+rwX /workspace" in runs and workdirs[-1].startswith("/workspace")
    # the project is installed, and exactly the tested versions (requirements/lock.txt) but for torch
    assert "grep -v '^torch==' requirements/lock.txt > /tmp/lock-without-torch.txt" in runs
    assert re.search(r"pip install [^&]*-r /tmp/lock-without-torch.txt", runs)
    assert re.search(r"pip install [^&]*--no-deps -e \.", runs)
    copied = [args.split()[0] for word, args in ins if word == "COPY"]
    for src in ("requirements/lock.txt", "setup.py", "rlhf_ds", "launch"):
        assert src in copied
        assert os.path.exists(os.path.join(REPO, src))
    assert os.path.exists(os.path.join(docker, "README.md"))
