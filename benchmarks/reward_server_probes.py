"""Probes of `rlhf-ds serve-reward` (issue #22): a real server on a tiny reward model, loopback only, every client loop
bounded in count and time.

    python benchmarks/reward_server_probes.py [--model RM_DIR] [--source DIR] [--no-token] [--skip-huge]

1. token: no token, a wrong one, the right one (expected 401, 401, 200)
2. nested JSON: 100,000 levels, and 2,000 levels inside a valid object (expected 400, no dead thread)
3. 1,000 concurrent small requests from one asyncio client (1,000 connections at once): statuses, resets, p50/p99
4. idle connections: 300 (the issue's figure) and 1,100 (past the default --max-connections 1024) opened and left
   silent; the server's threads and open files; a valid request meanwhile; how many the server closed after its
   read timeout
5. one valid 60 MiB request (a 60 MiB response text): status, seconds, server RSS idle / peak / after

`--source DIR` runs the server from another checkout (e.g. `git worktree add /tmp/old 8758ba5`) to compare with the
code before the fix (`--no-token`: it has no --token-file). Without `--model` the tiny models of the tests are built
(tests/dist_hybrid_models.py, ~10 s).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from conftest import start_reward_server  # noqa: E402
from dist_hybrid_models import build_tiny_models  # noqa: E402

HOST = "127.0.0.1"
PROMPT = "human : describe the red fox . assistant :"
SMALL = json.dumps({"prompts": [PROMPT], "responses": ["the fox runs fast ."]}).encode()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in MiB, Threads, open files of a process (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
            elif key == "Threads":
                out[key] = int(value)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def post(url: str, body: bytes, token: str | None, timeout: float = 30.0) -> tuple[int | str, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/score", data=body, headers=headers),
                                    timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return type(reason).__name__, str(reason).encode()


async def one_request(port: int, body: bytes, token: str | None, timeout: float) -> tuple[str, float]:
    t0 = time.monotonic()
    head = f"POST /score HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    head += "Connection: close\r\n\r\n"
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
        writer.write(head.encode() + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"
    except (ConnectionResetError, BrokenPipeError):
        status = "reset"
    except asyncio.TimeoutError:
        status = "timeout"
    except OSError as err:
        status = type(err).__name__
    finally:
        if writer is not None:
            writer.close()
    return status, time.monotonic() - t0


async def concurrent(port: int, n: int, token: str | None, timeout: float) -> list[tuple[str, float]]:
    return await asyncio.gather(*(one_request(port, SMALL, token, timeout) for _ in range(n)))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def fate(sock: socket.socket) -> str:
    """What the server did with a connection that never sent a request: "open", "closed", or "503" (refused)."""
    sock.setblocking(False)
    try:
        data = sock.recv(64)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    return "503" if data.startswith(b"HTTP/1.0 503") else "closed" if not data else "answered"


def fates(socks: list[socket.socket]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in socks:
        if getattr(s, "fate", "open") == "open":
            s.fate = fate(s)
        out[s.fate] = out.get(s.fate, 0) + 1
    return dict(sorted(out.items()))


class Conn(socket.socket):
    fate = "open"


def idle_probe(pid: int, url: str, port: int, n: int, token: str | None, read_timeout: float) -> None:
    socks = []
    try:
        t0 = time.monotonic()
        for _ in range(n):  # bounded in time too: a server with a short backlog takes seconds per connection
            if time.monotonic() - t0 > 60:
                print(f"  stopped opening connections after 60 s: {len(socks)} of {n} open")
                break
            try:
                socks.append(Conn(socket.AF_INET, socket.SOCK_STREAM))
                socks[-1].settimeout(5)
                socks[-1].connect((HOST, port))
            except OSError as err:
                socks.pop().close()
                print(f"  connection {len(socks) + 1}: {type(err).__name__}: {err}")
                break
        n, opened = len(socks), time.monotonic() - t0
        time.sleep(1.0)
        st = proc_status(pid)
        print(f"  {n} idle connections opened in {opened:.2f} s; 1 s later: server threads {st['Threads']}, open files "
              f"{st['fds']}, the connections {fates(socks)}")
        t_req = time.monotonic()
        statuses = [post(url, SMALL, token, timeout=30)[0] for _ in range(2)]
        print(f"  two valid requests meanwhile: HTTP {statuses} ({time.monotonic() - t_req:.3f} s for both)")
        time.sleep(read_timeout + 1.5)
        print(f"  {time.monotonic() - t0:.1f} s after the first was opened: the connections {fates(socks)}; server "
              f"threads {proc_status(pid)['Threads']}")
    finally:
        for s in socks:
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a reward model folder (default: the tests' tiny gpt2_rm, built in a temp dir)")
    ap.add_argument("--source", default=REPO, help="checkout to run the server from")
    ap.add_argument("--no-token", action="store_true", help="start the server without --token-file")
    ap.add_argument("--skip-huge", action="store_true", help="leave out the 60 MiB request")
    ap.add_argument("--read-timeout", type=float, default=10.0, help="the server's read timeout (default its own)")
    ap.add_argument("--huge-timeout", type=float, default=60.0, help="seconds the 60 MiB request may take")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="reward_probes_")
    model = args.model
    if model is None:
        model = build_tiny_models(os.path.join(work, "models"))["gpt2_rm"]
    token, token_file = None, None
    if not args.no_token:
        token, token_file = "probe-" + os.urandom(16).hex(), os.path.join(work, "token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
    extra = [] if args.read_timeout == 10.0 else ["--read-timeout", str(args.read_timeout)]
    extra += ["--token-file", token_file] if token_file else []
    server = start_reward_server(model, os.path.join(work, "server.log"), 0, "--host", HOST, *extra,
                                 source=args.source)
    url, port, pid = server.url, server.port, server.proc.pid
    print(f"server {url} (pid {pid}, source {args.source}, model {model})")
    try:
        status, _ = post(url, SMALL, token)
        idle = proc_status(pid)
        print(f"warm-up request: HTTP {status}; idle: RSS {idle['VmRSS']} MiB, {idle['Threads']} threads")

        print("1. token")
        for name, tok in (("no token", None), ("wrong token", "wrong"), ("right token", token)):
            status, answer = post(url, SMALL, tok)
            print(f"  {name}: HTTP {status} {answer[:110].decode(errors='replace')}")

        print("2. nested JSON")
        for name, body in (("100,000 levels", b"[" * 100_000 + b"]" * 100_000),
                           ("2,000 levels in 'prompts'",
                            b'{"prompts": ' + b"[" * 2000 + b"]" * 2000 + b', "responses": []}')):
            t0 = time.monotonic()
            status, answer = post(url, body, token)
            print(f"  {name}: HTTP {status} in {time.monotonic() - t0:.3f} s {answer[:100].decode(errors='replace')}")
        status, _ = post(url, SMALL, token)
        print(f"  a valid request after them: HTTP {status}; server threads {proc_status(pid)['Threads']}")

        print("3. 1,000 concurrent small requests (one connection each, opened at once; 120 s each at most)")
        t0 = time.monotonic()
        results = asyncio.run(concurrent(port, 1000, token, 120.0))
        wall = time.monotonic() - t0
        counts: dict[str, int] = {}
        for status, _ in results:
            counts[status] = counts.get(status, 0) + 1
        ok = [t for status, t in results if status == "200"]
        lat = f"p50 {percentile(ok, 0.5):.2f} s, p99 {percentile(ok, 0.99):.2f} s" if ok else "no answers"
        print(f"  {wall:.1f} s for all: statuses {dict(sorted(counts.items()))}; latency of the 200s {lat}; "
              f"server threads {proc_status(pid)['Threads']}")

        print("4. idle connections")
        for n in (300, 1100):
            idle_probe(pid, url, port, n, token, args.read_timeout)

        if not args.skip_huge:
            print("5. one valid 60 MiB request (a 60 MiB response)")
            response = "the fox runs fast . " * (60 * 2**20 // 20)
            body = json.dumps({"prompts": [PROMPT], "responses": [response]}).encode()
            del response
            before = proc_status(pid)
            peak_reset = reset_peak(pid)
            samples = [before["VmRSS"]]
            done = threading.Event()

            def sample():
                while not done.wait(0.02):
                    try:
                        samples.append(proc_status(pid)["VmRSS"])
                    except OSError:
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            status, answer = post(url, body, token, timeout=args.huge_timeout)
            took = time.monotonic() - t0
            done.set()
            sampler.join()
            after = proc_status(pid)
            peak = max(max(samples), after["VmHWM"] if peak_reset else 0)
            print(f"  body {len(body) / 2**20:.1f} MiB: HTTP {status} in {took:.2f} s "
                  f"{answer[:80].decode(errors='replace')}")
            print(f"  server RSS: idle {before['VmRSS']} MiB, peak {peak} MiB ({peak / before['VmRSS']:.2f}x), "
                  f"after {after['VmRSS']} MiB")
            status, _ = post(url, SMALL, token, timeout=30)
            print(f"  a small request after it: HTTP {status}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
