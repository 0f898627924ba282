"""Stand-in for `rlhf_ds.cli` in Slurm preemption tests (run as ENTRY_MODULE=fake_step with tests/cluster on PYTHONPATH).

`python -m fake_step <step> output_dir=DIR ...`, once per rank:
* first run (SLURM_RESTART_COUNT unset or 0): writes DIR/ready.<rank>, waits for SIGUSR1 (at most 120 s), then
  writes DIR/preempted.<rank> ("checkpoint saved") and exits 75;
* a requeued run (SLURM_RESTART_COUNT >= 1): writes DIR/resumed.<rank> and exits 0.
Every start is appended to DIR/events.log.
"""
import os
import signal
import sys
import time


def main() -> int:
    args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    out = args["output_dir"]
    os.makedirs(out, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    with open(os.path.join(out, "events.log"), "a", encoding="utf-8") as f:
        f.write(f"start rank={rank} world={os.environ.get('WORLD_SIZE')} restart={restart} "
                f"master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}\n")
    if restart > 0:
        open(os.path.join(out, f"resumed.{rank}"), "w").close()
        return 0
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
    sys.exit(main())
