"""`rlhf-ds serve-reward MODEL_DIR`: a saved reward model behind HTTP, for `reward.url` (standard library only).

    POST /score   {"prompts": [...], "responses": [...]}  ->  {"scores": [...]}    normalised scores
    GET  /health  ->  {"status": "ok", "model": MODEL_DIR}

Bad requests get HTTP 400 with {"error": ...}. There is no authentication: the server listens on 127.0.0.1 unless
told otherwise. One lock serialises the model; the threads only parse and answer requests.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_ds.config import ConfigError

log = logging.getLogger("rlhf_ds")

MAX_BODY_BYTES = 64 << 20  # a request larger than this is refused before it is read
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    pass


def parse_request(body: bytes) -> tuple[list[str], list[str]]:
    """(prompts, responses) of a /score body, or BadRequest saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not JSON: {err}") from None
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
    return texts["prompts"], texts["responses"]


def make_server(scorer, model_dir: str, host: str, port: int, batch_size: int) -> ThreadingHTTPServer:
    """A bound (not yet serving) server answering with `scorer` (a RewardScorer)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok", "model": model_dir})
            else:
                self._answer(404, {"error": f"no such path {self.path}; use POST /score or GET /health"})

        def do_POST(self) -> None:
            if self.path != "/score":
                self._answer(404, {"error": f"no such path {self.path}; use POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._answer(411, {"error": "a Content-Length header is required"})
                return
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the unread body must not be taken for the next request
                self._answer(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES}"})
                return
            try:
                prompts, responses = parse_request(self.rfile.read(length))
            except BadRequest as err:
                self._answer(400, {"error": str(err)})
                return
            try:
                with lock:
                    scores = scorer.score(prompts, responses, batch_size=batch_size, normalised=True)
            except Exception as err:  # e.g. out of memory: the client retries a 5xx, the server stays up
                log.exception("scoring failed")
                self._answer(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
                return
            self._answer(200, {"scores": scores})

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
            log.debug("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def load_scorer(model_dir: str, device, precision: str, max_prompt_tokens: int, max_seq_len: int):
    """A RewardScorer of a saved reward model, its lengths within the model's positions. A folder without a trained
    head is refused: it would be served with a random one."""
    from rlhf_ds.models.loading import ModelLoadError, resolve_model_dir
    from rlhf_ds.models.scalar_head import RewardScorer, read_saved_head
    from rlhf_ds.steps.evaluate import max_positions, pick_device

    if read_saved_head(resolve_model_dir(model_dir)) is None:
        raise ModelLoadError(f"{model_dir}: not a reward model (no scalar_head.safetensors / scalar_head.json); "
                             f"train one with `rlhf-ds rm`")
    scorer = RewardScorer(model_dir, pick_device(device or "auto"), precision, max_prompt_tokens, max_seq_len)
    limit = max_positions(scorer.model.config)
    if limit and scorer.max_seq_len > limit:
        scorer.max_seq_len = limit
        scorer.max_prompt_tokens = min(scorer.max_prompt_tokens, limit // 2)
    return scorer


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, device=None, precision: str = "fp32",
          max_prompt_tokens: int = 256, max_seq_len: int = 512, batch_size: int = 32) -> int:
    """Load the model, then answer requests until SIGTERM or SIGINT (exit status 0). Port 0 picks a free port: the
    printed line names the real one."""
    if batch_size < 1 or max_prompt_tokens < 1 or max_seq_len < 2:
        raise ConfigError("--batch-size and --max-prompt-tokens must be >= 1, --max-seq-len >= 2")
    scorer = load_scorer(model_dir, device, precision, max_prompt_tokens, max_seq_len)
    try:
        server = make_server(scorer, model_dir, host, port, batch_size)
    except OSError as err:  # the port is taken, the address is not this machine's
        raise ConfigError(f"cannot listen on {host}:{port}: {err}") from None
    real_host, real_port = server.server_address[:2]
    if host not in LOOPBACK:
        print(f"rlhf-ds serve-reward: warning: listening on {host} without authentication; anyone who can reach it "
              f"can use the model", file=sys.stderr, flush=True)

    def stop(signum, frame) -> None:  # shutdown() waits for serve_forever to return: call it from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"rlhf-ds serve-reward: listening on http://{real_host}:{real_port} (model {model_dir}, "
          f"device {scorer.device})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("rlhf-ds serve-reward: stopped", flush=True)
    return 0
