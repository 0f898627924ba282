"""Stand-in for `rlhf_ds.cli` in Slurm preemption tests (run as ENTRY_MODULE=fake_step with tests/cluster on PYTHONPATH).

`python -m fake_step <step> output_dir=DIR ...`, once per rank:
* first run (SLURM_RESTART_COUNT unset or 0): writes DIR/ready.<rank>, waits for SIGUSR1 (at most 120 s), then
  writes DIR/preempted.<rank> ("checkpoint saved") and exits 75;
* a requeued run (SLURM_RESTART_COUNT >= 1): writes DIR/resumed.<rank> and exits 0;
* with `kill=rank` or `kill=launcher`, the first run writes DIR/ready.<rank> and then every rank SIGKILLs itself, or
  rank 0, once every rank's ready file is there, its parent (DeepSpeed's launch.py in launcher mode), after which each ends as a real rank does when its
  launcher dies.
Every start is appended to DIR/events.log. Like `rlhf_ds.cli`, it watches its launcher and records its exit for the
supervisor (rlhf_ds.engine.launcher).
"""
import os
import signal
import sys
import time

from rlhf_ds.engine.launcher import record_exit, watch_launcher


def main() -> int:
    args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    out = args["output_dir"]
    os.makedirs(out, exist_ok=True)
    watch_launcher()
    rank = os.environ.get("RANK", "0")
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    with open(os.path.join(out, "events.log"), "a", encoding="utf-8") as f:
        f.write(f"start rank={rank} world={os.environ.get('WORLD_SIZE')} restart={restart} "
                f"master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}\n")
    if restart > 0:
        open(os.path.join(out, f"resumed.{rank}"), "w").close()
        return 0
    if args.get("kill"):
        open(os.path.join(out, f"ready.{rank}"), "w").close()
        if args["kill"] == "rank":
            os.kill(os.getpid(), signal.SIGKILL)
        elif rank == "0":
            # every rank must be up first: a rank that launch.py had not yet started would never write its ready file
            world = int(os.environ.get("WORLD_SIZE", "1"))
            deadline = time.time() + 60
            while time.time() < deadline and not all(os.path.exists(os.path.join(out, f"ready.{r}"))
                                                     for r in range(world)):
                time.sleep(0.05)
            os.kill(os.getppid(), signal.SIGKILL)  # launch.py (launcher mode); every rank then sees it gone
        time.sleep(60)  # the launcher watch ends this rank first
        return 3
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))
    open(os.path.join(out, f"ready.{rank}"), "w").close()
    deadline = time.time() + 120
    while not got and time.time() < deadline:
        time.sleep(0.1)
    if not got:
        return 3
    open(os.path.join(out, f"preempted.{rank}"), "w").close()
    return 75


if __name__ == "__main__":
    code = main()
    record_exit()
    sys.exit(code)
