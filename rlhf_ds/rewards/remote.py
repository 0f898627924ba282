"""A reward model behind HTTP (`reward.url`), e.g. `rlhf-ds serve-reward` on another GPU or host.

    POST {url}/score  {"prompts": [...], "responses": [...]}  ->  {"scores": [...]}

Transient failures (connection refused or reset, timeout, HTTP 5xx, e.g. 503 from a busy server) are retried with
exponential backoff; an answer that is wrong (HTTP 4xx, not JSON, wrong length, non-finite) is not: asking again would
give the same answer. HTTP 401 says the server wants another token (`reward.token_file`, sent as
`Authorization: Bearer TOKEN`). Redirects are not followed (the token would go along). Standard library only.
"""
from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from rlhf_ds.config import ConfigError
from rlhf_ds.rewards.base import RewardBatch, RewardError, as_scores
from rlhf_ds.rewards.server import read_token_file

log = logging.getLogger("rlhf_ds")


class _Transient(Exception):
    """A failure worth another attempt."""


class RemoteReward:
    name = "remote"

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 1.0,
                 batch_size: int = 64, token_file: str | None = None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:  # urllib would also open file:// and ftp://
            raise ConfigError(f"reward.url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s, self.batch_size = timeout_s, retries, backoff_s, batch_size
        self.token_file = token_file
        self.token = read_token_file(token_file, "reward.token_file") if token_file else None
        self.opener = urllib.request.build_opener(_NoRedirect)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        scores = [self._score(batch.prompts[i : i + self.batch_size], batch.responses[i : i + self.batch_size])
                  for i in range(0, len(batch), self.batch_size)]
        return torch.cat(scores) if scores else torch.zeros(0)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode("utf-8")
        answer = self._post_with_retries(body)
        try:
            scores = json.loads(answer)["scores"]
        except (ValueError, UnicodeDecodeError):
            raise RewardError(f"reward server {self.url} answered something that is not JSON: "
                              f"{answer[:200]!r}") from None
        except (KeyError, TypeError):
            raise RewardError(f"reward server {self.url} answered without a 'scores' list: {answer[:200]!r}") from None
        return as_scores(scores, len(prompts), f"reward server {self.url}")

    def _post_with_retries(self, body: bytes) -> bytes:
        for k in range(self.retries):
            try:
                return self._post(body)
            except _Transient as err:
                delay = self.backoff_s * 2 ** k
                log.warning("reward server %s: %s; retry %d of %d in %.3g s", self.url, err, k + 1, self.retries, delay)
                time.sleep(delay)
        try:
            return self._post(body)
        except _Transient as err:
            raise RewardError(f"reward server {self.url} gave no answer after {self.retries + 1} attempts: "
                              f"{err}") from None

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.url}/score", data=body, method="POST", headers=headers)
        try:
            with self.opener.open(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            if err.code >= 500:
                raise _Transient(f"HTTP {err.code}{detail}") from None
            if err.code == 401:
                fix = (f"the token in reward.token_file ({self.token_file}) is not the one the server was started with"
                       if self.token is not None else
                       "set reward.token_file to a file holding the token the server was started with")
                raise RewardError(f"reward server {self.url} refused the request: HTTP 401{detail}: {fix} "
                                  f"(rlhf-ds serve-reward --token-file)") from None
            raise RewardError(f"reward server {self.url} refused the request: HTTP {err.code}{detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # refused, reset, timed out
            reason = getattr(err, "reason", None) or err
            raise _Transient(f"{type(reason).__name__}: {reason}") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (a 3xx error), not a new request: urllib would send the token to the new address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} message, when it sent one."""
    try:
        return f" ({json.loads(err.read())['error']})"
    except Exception:
        return ""
