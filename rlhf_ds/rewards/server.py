"""`rlhf-ds serve-reward MODEL_DIR`: a saved reward model behind HTTP, for `reward.url` (standard library only).

    POST /score   {"prompts": [...], "responses": [...]}  ->  {"scores": [...]}    normalised scores
    GET  /health  ->  {"status": "ok", "model": MODEL_DIR}

Every request is bounded in work, not only in bytes (docs/rl.md, "serving a reward model"):

* texts: at most `max_texts` per list; each text is cut by characters before it is tokenised (a prompt keeps its end,
  a response its start) to a length that holds every token the scorer keeps, so an ordinary request scores exactly
  as before and a 60 MiB text costs what a short one does;
* time: `request_timeout_s` from the moment a request starts arriving to its answer (reading, waiting for the model,
  scoring: checked between forward batches); past it, HTTP 503 (the client retries);
* connections: a connection holds no thread until its request line and headers are all there: one selector thread
  watches them all and reads the headers (at most `MAX_HEAD_BYTES`, else HTTP 431), then hands the connection to a
  fixed pool of `workers` threads (a request that waits for one past its time gets HTTP 503). At most
  `max_connections` are open: past that the oldest idle one (no byte for 1 s at least) is closed, or, when there is
  none, the new one gets HTTP 503. An idle connection is closed after `read_timeout_s` without a byte; a request whose
  headers or body stall that long gets HTTP 408;
* memory: the bodies being read together are at most `BODY_BUDGET_BYTES` (else 503); a body whose JSON would hold far
  more values than `max_texts` allows is refused before it is parsed; JSON nested too deep for the parser is a 400.

With a token (`--token-file`) every request but /health must carry `Authorization: Bearer TOKEN` (compared in constant
time) or gets HTTP 401 before its body is read. The token travels in clear (plain HTTP, no TLS). One lock serialises
the model; the workers parse and answer requests.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import re
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Optional

from rlhf_ds.config import ConfigError

log = logging.getLogger("rlhf_ds")

MAX_BODY_BYTES = 64 << 20  # a request larger than this is refused before it is read
BODY_BUDGET_BYTES = 2 * MAX_BODY_BYTES  # the bodies of all requests being read and parsed at once
LOOPBACK = ("127.0.0.1", "localhost", "::1")
BACKLOG = 1024  # connections the kernel queues before the server accepts them (Linux caps it at net.core.somaxconn)
SLACK_CHARS = 1024  # characters kept beyond the cut bound: the word the cut falls in tokenises differently
MIN_IDLE_TO_EVICT_S = 1.0  # an idle connection younger than this may have its request on the way: not evicted
MAX_HEAD_BYTES = 64 << 10  # a request line and headers longer than this get 431
MAX_LINGER_S = 2.0  # a refused request's unread body is drained this long at most, so the client reads the answer
_CLOSING_MAX = 256  # refused connections drained at once; past that they are closed at once
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string (escapes included)
_DEEP = re.compile(rb"(?:[\[{]\s*){33}")  # 33 arrays or objects opened in a row: a body this server never needs
_HEAD_END = re.compile(rb"\n\r?\n")  # the empty line after the headers (http.server also reads a bare LF as a line end)


@dataclass
class Limits:
    """What one `serve-reward` process gives its clients at most (the CLI's options)."""

    workers: int = 4  # threads answering requests
    max_connections: int = 1024  # open connections; past it the oldest idle one is closed, else the new one gets 503
    max_texts: int = 1024  # prompts (and responses) per request
    read_timeout_s: float = 10.0  # an idle connection, or a read without a byte for this long, is closed
    request_timeout_s: float = 30.0  # from a request's first byte to its answer; past it, 503
    token: Optional[str] = None  # the bearer token every /score request must carry

    def check(self) -> None:
        if self.workers < 1 or self.max_connections < 1 or self.max_texts < 1:
            raise ConfigError("--workers, --max-connections and --max-texts must be >= 1")
        if not (self.read_timeout_s > 0 and self.request_timeout_s > 0):
            raise ConfigError("--read-timeout and --request-timeout must be > 0")


class BadRequest(ValueError):
    status = 400


class TooLarge(BadRequest):
    status = 413


class Busy(Exception):
    """Worth asking again later: HTTP 503."""


def parse_request(body: bytes, max_texts: int = 1024) -> tuple[list[str], list[str]]:
    """(prompts, responses) of a /score body, or BadRequest saying what is wrong with it."""
    # a body of many tiny values would take ~60 bytes of memory per value once parsed: count them first. Every string
    # has an opening quote never preceded by a backslash, so `strings` is at least their number
    strings = body.count(b'"') - body.count(b'\\"')
    values = strings
    if strings <= 4 * max_texts + 16:  # few strings: count the other values in the body with its strings emptied
        shape = _STRING.sub(b'""', body)
        if _DEEP.search(shape):
            raise BadRequest("body is not JSON this server reads: nested too deeply")
        values = shape.count(b",") + shape.count(b"[") + shape.count(b"{")
    if values > 4 * max_texts + 16:
        raise TooLarge(f"the body holds more than {4 * max_texts + 16} JSON values; at most {max_texts} prompts and "
                       f"as many responses per request (--max-texts)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not JSON: {err}") from None
    except RecursionError:
        raise BadRequest("body is not JSON this server reads: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be an object with 'prompts' and 'responses'")
    texts = {}
    for key in ("prompts", "responses"):
        value = data.get(key)
        if not isinstance(value, list):
            raise BadRequest(f"'{key}' must be a list of strings")
        bad = next((i for i, t in enumerate(value) if not isinstance(t, str)), None)
        if bad is not None:
            raise BadRequest(f"'{key}'[{bad}] is a {type(value[bad]).__name__}, not a string")
        texts[key] = value
    if len(texts["prompts"]) != len(texts["responses"]):
        raise BadRequest(f"{len(texts['prompts'])} prompts but {len(texts['responses'])} responses")
    if len(texts["prompts"]) > max_texts:
        raise TooLarge(f"{len(texts['prompts'])} prompts; at most {max_texts} per request (--max-texts)")
    return texts["prompts"], texts["responses"]


def char_bounds(tokenizer, max_prompt_tokens: int, max_seq_len: int) -> tuple[int, int]:
    """(prompt, response) characters that hold every token the scorer keeps of a text. A token spells at most
    `longest` characters (its vocabulary string: bytes for byte-level BPE, at least the characters it covers), so the
    last max_prompt_tokens tokens of a prompt lie in its last max_prompt_tokens * longest characters, and the first
    max_seq_len tokens of a response in its first max_seq_len * longest. SLACK_CHARS more keep the word the cut falls
    in (which may tokenise differently once cut) away from the kept tokens."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_prompt_tokens * longest + SLACK_CHARS, max_seq_len * longest + SLACK_CHARS


def cut_texts(prompts: list[str], responses: list[str], prompt_chars: int,
              response_chars: int) -> tuple[list[str], list[str]]:
    """Prompts cut to their last `prompt_chars` characters, responses to their first `response_chars` (texts within
    the bounds are returned as they are)."""
    return [p[-prompt_chars:] for p in prompts], [r[:response_chars] for r in responses]


def read_token_file(path: str, what: str) -> str:
    """The shared secret in `path` (surrounding whitespace dropped), or ConfigError naming `what` set it."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path}: cannot read it: {err}") from None
    if not token or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"{what} {path}: expected one token of printable ASCII characters without spaces")
    return token


def _answer_bytes(code: int, reason: str, payload: dict, retry_after: bool = True) -> bytes:
    body = json.dumps(payload).encode("utf-8")
    retry = "Retry-After: 1\r\n" if retry_after else ""
    return (f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{retry}Connection: close\r\n\r\n").encode("ascii") + body


@dataclass
class _Waiting:
    """A connection the selector thread watches until its request's headers are all there."""

    peer: object
    last: float  # its last byte (or its accept): idle since then
    first: float = 0.0  # the request's first byte: its time starts then
    head: bytearray = field(default_factory=bytearray)  # what has arrived


class _Reader(io.RawIOBase):
    """A request's bytes for a worker: first what the selector thread read (`head`), then the socket, each read ending
    by the request's deadline (Busy past it) or after `read_timeout_s` without a byte (TimeoutError)."""

    def __init__(self, conn: socket.socket, head: bytes, deadline: float, limits: Limits):
        self.conn, self.head, self.deadline, self.limits = conn, memoryview(head), deadline, limits

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if len(self.head):
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        left = self.deadline - time.monotonic()
        if left > 0:
            self.conn.settimeout(min(self.limits.read_timeout_s, left))
            try:
                return self.conn.recv_into(b)
            except TimeoutError:
                if time.monotonic() < self.deadline:
                    raise
            finally:
                self.conn.settimeout(self.limits.read_timeout_s)
        raise Busy(f"the request did not arrive within --request-timeout ({self.limits.request_timeout_s:g} s); retry")


class _BodyBudget:
    def __init__(self, total: int):
        self.left, self.lock = total, threading.Lock()

    def take(self, n: int) -> bool:
        with self.lock:
            if n > self.left:
                return False
            self.left -= n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.left += n


class RewardServer:
    """A listening socket, one selector thread (serve_forever) for the connections whose request's headers are not all
    there yet, and `limits.workers` threads that each answer one request at a time with `handler_class`."""

    def __init__(self, host: str, port: int, handler_class, limits: Limits):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.handler_class, self.limits = handler_class, limits
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ, "listen")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.idle: dict[socket.socket, _Waiting] = {}  # headers not all there; in the order of their last byte
        self.closing: dict[socket.socket, float] = {}  # answered by this thread, drained until EOF or this time
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.queued: dict[socket.socket, float] = {}  # in `jobs`, no worker yet: the request's deadline
        self.busy, self._busy_lock = 0, threading.Lock()  # queued or with a worker; the lock also guards `queued`
        self._stop = threading.Event()
        self.refused, self._refusal_logged = 0, 0.0

    # -- the selector thread -------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        workers = [threading.Thread(target=self._work, name=f"reward-worker-{i}", daemon=True)
                   for i in range(self.limits.workers)]
        for w in workers:
            w.start()
        try:
            while not self._stop.is_set():
                for key, _ in self.selector.select(timeout=0.2):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain(self._wake_r)
                    elif key.data == "closing":
                        if key.fileobj in self.closing:
                            self._drain_closing(key.fileobj)
                    elif key.fileobj in self.idle:
                        self._read_head(key.fileobj)
                self._expire(time.monotonic())
        finally:
            for _ in workers:
                self.jobs.put(None)
            deadline = time.monotonic() + 5.0
            for w in workers:  # requests being answered may finish
                w.join(timeout=max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Stop serve_forever (from any thread or a signal handler)."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def server_close(self) -> None:
        for conn in list(self.idle) + list(self.closing):
            self._close(conn)
        self.selector.close()
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()

    def open_connections(self) -> int:
        return len(self.idle) + self.busy

    def _accept(self) -> None:
        for _ in range(256):  # bounded per round: the loop also has idle connections to serve
            try:
                conn, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. out of file descriptors: the connection stays queued, try again later
                log.warning("serve-reward: accept failed: %s", err)
                return
            if self.open_connections() >= self.limits.max_connections:
                oldest = next(iter(self.idle), None)  # dicts keep insertion order: the one idle the longest
                if oldest is not None and time.monotonic() - self.idle[oldest].last >= MIN_IDLE_TO_EVICT_S:
                    self._close(oldest)  # makes room
                else:
                    self._refuse(conn)
                    continue
            conn.setblocking(False)
            self.idle[conn] = _Waiting(peer, time.monotonic())
            self.selector.register(conn, selectors.EVENT_READ, "idle")

    def _read_head(self, conn: socket.socket) -> None:
        """Take what a waiting connection sent (never blocks); once its headers are all there, queue it for a worker."""
        waiting = self.idle[conn]
        try:
            data = conn.recv(MAX_HEAD_BYTES + 1 - len(waiting.head))  # >= 1: a longer head was refused
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client has gone
            self._close(conn)
            return
        now = time.monotonic()
        if not waiting.head:
            waiting.first = now
        start = max(0, len(waiting.head) - 2)
        waiting.head += data
        del self.idle[conn]
        if _HEAD_END.search(waiting.head, start):  # a worker answers it
            self.selector.unregister(conn)
            with self._busy_lock:
                self.busy += 1
                self.queued[conn] = waiting.first + self.limits.request_timeout_s
            self.jobs.put((conn, waiting.peer, waiting.first, bytes(waiting.head)))
        elif len(waiting.head) > MAX_HEAD_BYTES:
            self._answer_and_close(conn, _answer_bytes(431, "Request Header Fields Too Large", {
                "error": f"request line and headers longer than {MAX_HEAD_BYTES >> 10} KiB"}, retry_after=False))
        elif now - waiting.first > self.limits.request_timeout_s:
            self._answer_and_close(conn, _answer_bytes(408, "Request Timeout", {
                "error": f"the request's headers did not arrive within --request-timeout "
                         f"({self.limits.request_timeout_s:g} s)"}, retry_after=False))
        else:
            waiting.last = now
            self.idle[conn] = waiting  # last in the order of last bytes

    def _refuse(self, conn: socket.socket) -> None:
        """503 without a worker: send it, then drain what the client sends so that closing does not reset it."""
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged > 30:
            self._refusal_logged = now
            log.warning("serve-reward: %d connections open, all busy (--max-connections %d): refusing new ones with "
                        "HTTP 503 (%d so far)", self.open_connections(), self.limits.max_connections, self.refused)
        conn.setblocking(False)
        self._answer_and_close(conn, _answer_bytes(503, "Service Unavailable", {
            "error": f"server busy: {self.limits.max_connections} connections open (--max-connections); retry"}))

    def _answer_and_close(self, conn: socket.socket, answer: bytes) -> None:
        """Answer from this thread (a non-blocking socket, no worker), then drain what the client sends for a while so
        that closing does not reset the connection before the client has read the answer."""
        self.idle.pop(conn, None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        try:
            self._drain(conn)
            conn.send(answer)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self.closing) >= _CLOSING_MAX:
            conn.close()
            return
        self.closing[conn] = time.monotonic() + 1.0
        self.selector.register(conn, selectors.EVENT_READ, "closing")

    def _late_answer(self) -> bytes:
        return _answer_bytes(503, "Service Unavailable", {
            "error": f"no worker was free within --request-timeout ({self.limits.request_timeout_s:g} s) "
                     f"(--workers {self.limits.workers}); retry"})

    def _drain_closing(self, conn: socket.socket) -> None:
        if not self._drain(conn):
            self._close(conn)

    @staticmethod
    def _drain(conn: socket.socket) -> bool:
        """Read what is there (never blocks); False once the peer has closed or the socket failed."""
        try:
            for _ in range(64):
                if not conn.recv(65536):
                    return False
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return True

    def _close(self, conn: socket.socket) -> None:
        self.idle.pop(conn, None)
        self.closing.pop(conn, None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _expire(self, now: float) -> None:
        while self.idle:
            conn, waiting = next(iter(self.idle.items()))
            if now - waiting.last < self.limits.read_timeout_s:
                break
            if waiting.head:  # part of a request, then nothing
                self._answer_and_close(conn, _answer_bytes(408, "Request Timeout", {
                    "error": f"no byte of the request's headers for --read-timeout "
                             f"({self.limits.read_timeout_s:g} s)"}, retry_after=False))
            else:
                self._close(conn)
        for conn, until in list(self.closing.items()):
            if now > until:
                self._close(conn)
        with self._busy_lock:  # requests still waiting for a worker past their time: 503 from here
            late = [conn for conn, deadline in self.queued.items() if now > deadline]
            for conn in late:
                del self.queued[conn]
            self.busy -= len(late)
        for conn in late:  # the worker that takes its job skips it
            self._answer_and_close(conn, self._late_answer())

    # -- the workers ---------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            conn, peer, since, head = job
            with self._busy_lock:
                if self.queued.pop(conn, None) is None:  # its time ran out in the queue: answered (503) already
                    continue
            try:
                if time.monotonic() > since + self.limits.request_timeout_s:  # ran out just now
                    conn.settimeout(self.limits.read_timeout_s)
                    conn.sendall(self._late_answer())
                    self._linger(conn)
                else:
                    handler = self.handler_class(conn, peer, self, since, head)
                    if handler.unread:
                        self._linger(conn)
            except Exception as err:  # the client went away
                log.debug("serve-reward: connection from %s: %s: %s", peer, type(err).__name__, err)
            finally:
                try:
                    conn.close()
                finally:
                    with self._busy_lock:
                        self.busy -= 1

    @staticmethod
    def _linger(conn: socket.socket) -> None:
        """Answered before reading the whole body: take the rest (bounded) so that the close does not reset the
        connection before the client has read the answer."""
        try:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(0.5)
            end, buf = time.monotonic() + MAX_LINGER_S, bytearray(65536)
            while time.monotonic() < end and conn.recv_into(buf):
                pass
        except OSError:
            pass


def make_server(scorer, model_dir: str, host: str, port: int, batch_size: int,
                limits: Limits | None = None) -> RewardServer:
    """A bound (not yet serving) server answering with `scorer` (a RewardScorer)."""
    limits = limits or Limits()
    limits.check()
    lock = threading.Lock()
    budget = _BodyBudget(BODY_BUDGET_BYTES)
    prompt_chars, response_chars = char_bounds(scorer.tokenizer, scorer.max_prompt_tokens, scorer.max_seq_len)
    token = None if limits.token is None else limits.token.encode("ascii")

    def score(prompts: list[str], responses: list[str], deadline: float) -> list[float]:
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Busy(f"the model was busy for --request-timeout ({limits.request_timeout_s:g} s); retry")
        try:
            out: list[float] = []
            for i in range(0, len(prompts), batch_size):
                if time.monotonic() > deadline:
                    raise Busy(f"scoring took longer than --request-timeout ({limits.request_timeout_s:g} s) "
                               f"after {i} of {len(prompts)} texts; send fewer per request (reward.batch_size)")
                out += scorer.score(prompts[i : i + batch_size], responses[i : i + batch_size], batch_size=batch_size,
                                    normalised=True)
            return out
        finally:
            lock.release()

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.read_timeout_s  # each read of the socket
        unread = False  # answered before the body was read (the server drains it before closing)

        def __init__(self, conn, peer, server, since: float, head: bytes):
            self.deadline, self.head = since + limits.request_timeout_s, head
            super().__init__(conn, peer, server)

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the socket's own reader: read what the selector thread has read first
            self.rfile = io.BufferedReader(_Reader(self.connection, self.head, self.deadline, limits))

        def handle(self) -> None:  # one request per connection (HTTP/1.0)
            self.close_connection = True
            self.handle_one_request()

        def _answer(self, code: int, payload: dict, headers: dict | None = None) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if token is None:
                return True
            scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
            try:
                given_bytes = given.strip().encode("ascii")
            except UnicodeEncodeError:
                return False
            return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, token)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok", "model": model_dir} if self._authorised() else {"status": "ok"})
            else:
                self._answer(404, {"error": f"no such path {self.path}; use POST /score or GET /health"})

        def do_POST(self) -> None:
            self.unread = True  # until the body has been read
            if self.path != "/score":
                self._answer(404, {"error": f"no such path {self.path}; use POST /score"})
                return
            if not self._authorised():
                missing = "Authorization" not in self.headers
                self._answer(401, {"error": "this server needs a token (Authorization: Bearer ...; the client's "
                                   "reward.token_file)" if missing else "wrong token"},
                             {"WWW-Authenticate": "Bearer"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._answer(411, {"error": "a Content-Length header is required"})
                return
            if not 0 <= length <= MAX_BODY_BYTES:
                self._answer(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES}"})
                return
            if not budget.take(length):
                self._answer(503, {"error": "server busy reading other large requests; retry"}, {"Retry-After": "1"})
                return
            try:
                try:
                    body = self._read_body(length)
                except TimeoutError:
                    self._answer(408, {"error": f"no byte of the body for --read-timeout "
                                                f"({limits.read_timeout_s:g} s)"})
                    return
                except Busy as err:  # past the request's deadline
                    self._answer(503, {"error": str(err)}, {"Retry-After": "1"})
                    return
                self.unread = False
                prompts, responses = parse_request(body, limits.max_texts)
                del body
            except BadRequest as err:
                self._answer(err.status, {"error": str(err)})
                return
            finally:
                budget.give(length)
            prompts, responses = cut_texts(prompts, responses, prompt_chars, response_chars)
            try:
                scores = score(prompts, responses, self.deadline)
            except Busy as err:
                self._answer(503, {"error": str(err)}, {"Retry-After": "1"})
                return
            except Exception as err:  # e.g. out of memory: the client retries a 5xx, the server stays up
                log.exception("scoring failed")
                self._answer(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
                return
            self._answer(200, {"scores": scores})

        def _read_body(self, length: int) -> bytearray:
            body = bytearray(length)
            view, got = memoryview(body), 0
            while got < length:
                n = self.rfile.readinto(view[got : got + (1 << 20)])
                if not n:
                    raise ConnectionError(f"the client closed the connection after {got} of {length} body bytes")
                got += n
            return body

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
            log.debug("%s %s", self.address_string(), format % args)

    return RewardServer(host, port, Handler, limits)


def load_scorer(model_dir: str, device, precision: str, max_prompt_tokens: int, max_new_tokens: int):
    """A RewardScorer of a saved reward model for texts from a policy with this budget (the one length budget,
    `reward_lengths`). A folder without a trained head is refused: it would be served with a random one."""
    from rlhf_ds.models.loading import ModelLoadError, pick_device, resolve_model_dir
    from rlhf_ds.models.scalar_head import read_saved_head, reward_scorer

    if read_saved_head(resolve_model_dir(model_dir)) is None:
        raise ModelLoadError(f"{model_dir}: not a reward model (no scalar_head.safetensors / scalar_head.json); "
                             f"train one with `rlhf-ds rm`")
    return reward_scorer(model_dir, pick_device(device or "auto"), precision, max_prompt_tokens, max_new_tokens)


def _fit_file_limit(limits: Limits) -> None:
    """Raise the open-file limit to hold max_connections (up to the hard limit), else lower max_connections."""
    need = limits.max_connections + limits.workers + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < need:
            limits.max_connections = max(1, soft - limits.workers - 64)
            print(f"rlhf-ds serve-reward: warning: {soft} open files allowed (ulimit -n): at most "
                  f"{limits.max_connections} connections", file=sys.stderr, flush=True)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, device=None, precision: str = "fp32",
          max_prompt_tokens: int = 256, max_new_tokens: int = 256, batch_size: int = 32, token_file: str | None = None,
          workers: int = 4, max_connections: int = 1024, max_texts: int = 1024, read_timeout_s: float = 10.0,
          request_timeout_s: float = 30.0) -> int:
    """Load the model, then answer requests until SIGTERM or SIGINT (exit status 0). Port 0 picks a free port: the
    printed line names the real one."""
    if batch_size < 1 or max_prompt_tokens < 1 or max_new_tokens < 1:
        raise ConfigError("--batch-size, --max-prompt-tokens and --max-new-tokens must be >= 1")
    token = read_token_file(token_file, "--token-file") if token_file else None
    limits = Limits(workers, max_connections, max_texts, read_timeout_s, request_timeout_s, token)
    limits.check()
    _fit_file_limit(limits)
    scorer = load_scorer(model_dir, device, precision, max_prompt_tokens, max_new_tokens)
    try:
        server = make_server(scorer, model_dir, host, port, batch_size, limits)
    except OSError as err:  # the port is taken, the address is not this machine's
        raise ConfigError(f"cannot listen on {host}:{port}: {err}") from None
    real_host, real_port = server.server_address[:2]
    if host not in LOOPBACK and token is None:
        print(f"rlhf-ds serve-reward: warning: listening on {host} without authentication; anyone who can reach it "
              f"can use the model (--token-file)", file=sys.stderr, flush=True)

    def stop(signum, frame) -> None:
        server.shutdown()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"rlhf-ds serve-reward: listening on http://{real_host}:{real_port} (model {model_dir}, "
          f"device {scorer.device}{', token required' if token else ''})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("rlhf-ds serve-reward: stopped", flush=True)
    return 0
