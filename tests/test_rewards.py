"""Reward sources (rlhf_ds/rewards): Python functions with the row columns, the weighted sum, the in-process reward
model against the scorer, and `rlhf-ds serve-reward` as a real subprocess on 127.0.0.1 with the HTTP client's retries.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import REPO, start_reward_server
from dist_hybrid_models import tiny_models
from rlhf_ds import cli
from rlhf_ds.config import ConfigError
from rlhf_ds.data.builtin_task import BuiltinTask
from rlhf_ds.data.formats import PromptExample, parse_prompts
from rlhf_ds.rewards import FunctionReward, RemoteReward, RewardBatch, RewardError, WeightedReward

RULES = os.path.join(REPO, "examples", "rewards", "builtin_rules.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def texts(n: int) -> tuple[list[str], list[str]]:
    rows = BuiltinTask(0).sft_rows(n)
    return [r["prompt"] for r in rows], [r["response"] for r in rows]


def batch(prompts, responses, rows=None) -> RewardBatch:
    return RewardBatch(list(prompts), list(responses), rows if rows is not None else [{} for _ in prompts])


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---- prompt rows keep their other columns ----------------------------------------------------------------------------


def test_prompt_examples_keep_the_other_columns():
    rows = [{"prompt": "2 + 2 =", "answer": "4", "id": 7}]
    assert parse_prompts(rows)[0] == [PromptExample(prompt="2 + 2 =", columns={"answer": "4", "id": 7})]
    renamed = parse_prompts([{"instruction": "hi", "answer": "yo"}], columns={"prompt": "instruction"})[0]
    assert renamed == [PromptExample(prompt="hi", columns={"answer": "yo"})]
    chat = [{"role": "user", "content": "hello"}]
    assert parse_prompts([{"messages": chat, "answer": "hi"}])[0][0].columns == {"answer": "hi"}
    assert parse_prompts([{"question": "why?"}])[0] == [PromptExample(prompt="why?")]


# ---- Python reward functions -----------------------------------------------------------------------------------------


def test_function_gets_prompts_responses_and_the_columns_every_row_has(tmp_path):
    path = write(tmp_path / "seen.py", "SEEN = []\n"
                 "def fn(prompts, responses, **columns):\n"
                 "    SEEN.append(dict(prompts=prompts, responses=responses, **columns))\n"
                 "    return [len(r) for r in responses]\n")
    reward = FunctionReward(f"{path}:fn")
    rows = [{"answer": "a", "id": 1, "prompts": "clash"}, {"answer": "b", "prompts": "clash"}]
    out = reward(batch(["p", "q"], ["xyz", ""], rows))
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 0.0]
    # "id" is not in every row; a column named like a call argument is not passed (it would clash)
    assert reward.fn.__globals__["SEEN"] == [{"prompts": ["p", "q"], "responses": ["xyz", ""], "answer": ["a", "b"]}]


def test_function_by_module_name_and_the_example_rules(tmp_path, monkeypatch):
    write(tmp_path / "my_rewards_mod.py", "import numpy as np\n"
          "def fn(prompts, responses, **kw):\n    return np.array([0.5] * len(responses), dtype=np.float32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert FunctionReward("my_rewards_mod:fn")(batch(["p"], ["r"])).tolist() == [0.5]
    exact = FunctionReward(f"{RULES}:exact_match")
    rows = [{"answer": " 4 "}, {"answer": "5"}]
    assert exact(batch(["2 + 2 =", "2 + 2 ="], ["4", "4"], rows)).tolist() == [1.0, 0.0]


def test_on_topic_rule_by_hand():
    on_topic = FunctionReward(f"{RULES}:on_topic")
    prompt = "human : describe the red fox . assistant :"
    responses = ["the fox runs fast .",  # subject +1, full stop +0.5
                 "the fox runs and the fox runs",  # subject +1, no stop, fox and runs repeated -1
                 "a big tree .",  # other subject, full stop
                 ""]
    assert on_topic(batch([prompt] * 4, responses)).tolist() == [1.5, 0.0, 0.5, 0.0]


def test_cheerful_rule_by_hand():
    cheerful = FunctionReward(f"{RULES}:cheerful")
    prompt = "human : describe the red fox . assistant :"
    responses = ["the fox is happy and warm . it sings .",  # happy, warm, sings: +1.5
                 "the fox is sad . it is happy .",  # happy -> +0.5, sad -> -0.5
                 "the fox is happy and happy .",  # happy once +0.5, happy repeated -0.5
                 "happy warm sweet calm gentle .",  # 5 cheerful words, capped at +1.5
                 "the fox is dark and cold . it falls and cries ."]  # 4 gloomy words, capped at -1.5
    assert cheerful(batch([prompt] * 5, responses)).tolist() == [1.5, 0.0, 0.0, 1.5, -1.5]


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:fn", r"'no_such_module_xyz:fn': cannot import no_such_module_xyz"),
    ("missing/file.py:fn", r"'missing/file.py:fn': no such file .*missing/file\.py"),
    ("json:no_such_function", r"'json:no_such_function': json has no attribute 'no_such_function'"),
    ("json:__doc__", r"'json:__doc__': __doc__ is a str, not a function"),
    ("json", r"'json': expected 'package.module:function'"),
])
def test_function_spec_errors_name_the_spec(spec, match):
    with pytest.raises(ConfigError, match=match):
        FunctionReward(spec)


def test_function_whose_module_fails_to_import(tmp_path):
    path = write(tmp_path / "broken.py", "raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError, match=r"broken\.py:fn'.*RuntimeError: no GPU here"):
        FunctionReward(f"{path}:fn")


@pytest.mark.parametrize("body, match", [
    ("return [1.0]", r"returned 1 scores for 3 responses"),
    ("return [1.0, float('nan'), 2.0]", r"bad score at index 1: nan"),
    ("return [1.0, 2.0, None]", r"bad score at index 2: None"),
    ("return [1.0, 'x', 2.0]", r"bad score at index 1: 'x'"),
    ("return 3.0", r"returned float; expected a sequence of 3 numbers"),
    ("return {'a': 1}", r"returned dict"),
    ("raise KeyError('answer')", r"raised KeyError: 'answer'"),
])
def test_bad_function_output_is_a_reward_error_naming_the_function(tmp_path, body, match):
    path = write(tmp_path / "bad.py", f"def fn(prompts, responses, **kw):\n    {body}\n")
    with pytest.raises(RewardError, match=rf"reward function {re.escape(path)}:fn .*{match}"):
        FunctionReward(f"{path}:fn")(batch(["a", "b", "c"], ["x", "y", "z"]))


# ---- weighted sum ----------------------------------------------------------------------------------------------------


class Constant:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def __call__(self, b):
        return torch.tensor(self.values)


def test_weighted_reward_totals_and_unweighted_components():
    total, parts = WeightedReward([("model", 2.0, Constant("model", [1.0, -1.0, 0.5])),
                                   ("function", 0.5, Constant("function", [4.0, 0.0, -2.0]))])(batch("abc", "xyz"))
    assert total.tolist() == [4.0, -2.0, 0.0]
    assert {k: v.tolist() for k, v in parts.items()} == {"model": [1.0, -1.0, 0.5], "function": [4.0, 0.0, -2.0]}
    with pytest.raises(RewardError, match=r"reward source 'remote' returned 2 scores for 3"):
        WeightedReward([("remote", 1.0, Constant("remote", [1.0, 2.0]))])(batch("abc", "xyz"))
    with pytest.raises(RewardError, match=r"tensor of shape \(3, 1\)"):
        WeightedReward([("model", 1.0, Constant("model", [[1.0], [2.0], [3.0]]))])(batch("abc", "xyz"))


# ---- the in-process reward model -------------------------------------------------------------------------------------


def rollout(tokenizer, prompts, responses, ended=True):
    """Actor ids as the PPO step holds them: left-padded BOS + prompts, then right-padded responses ending with EOS (or,
    with `ended=False`, cut at the length limit before it)."""
    from rlhf_ds.data.features import pad_batch

    p_ids, p_mask = pad_batch([[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]
                               for p in prompts], tokenizer.pad_token_id, side="left")
    r_ids, r_mask = pad_batch([tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ended
                               for r in responses], tokenizer.pad_token_id, side="right")
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1]


def test_ended_with_eos_appends_eos_to_cut_responses_only():
    from rlhf_ds.rewards.model import ended_with_eos

    # prompt columns 0-1; row 0 ends with EOS (2) then a pad; row 1 is cut at the last column
    seq, mask = torch.tensor([[0, 5, 6, 7, 2, 0], [4, 5, 6, 7, 8, 9]]), torch.tensor([[0, 1, 1, 1, 1, 0], [1] * 6])
    got_seq, got_mask = ended_with_eos(seq, mask, 2, eos_token_id=2, pad_token_id=0)
    assert got_seq.tolist() == [[0, 5, 6, 7, 2, 0, 0], [4, 5, 6, 7, 8, 9, 2]]
    assert got_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert ended_with_eos(seq[:1], mask[:1], 2, 2, 0)[0].equal(seq[:1])  # every response ended: nothing appended


def test_model_reward_on_actor_ids_and_through_another_tokenizer(models):
    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.models.scalar_head import RewardScorer, load_scalar_head_model
    from rlhf_ds.rewards.model import ModelReward

    prompts, responses = texts(6)
    tok = load_tokenizer(models["gpt2"])
    seq, mask, P = rollout(tok, prompts, responses)
    b = RewardBatch(prompts, responses, [{}] * 6, seq, mask, P)

    # same tokenizer: the actor's ids as they are, the score at each one's last real token (pads and micro-batches of
    # 4 + 2 change nothing)
    rm = load_scalar_head_model(models["gpt2_rm"], {}, tokenizer=tok).eval()
    got = ModelReward(rm, tok, tok, micro_batch_size=4, max_prompt_tokens=24, max_new_tokens=16)(b)
    with torch.no_grad():
        alone = [rm.normalise(rm.raw_scores(s[m.bool()][None], m[m.bool()][None])).item() for s, m in zip(seq, mask)]
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.tolist() == pytest.approx(alone, abs=1e-5)
    assert abs(rm.offset) > 0  # the fixture's normalisation is not the identity: normalise() was applied

    # responses cut before their EOS are scored with EOS appended, as RM training, the offline scorer (what
    # `rlhf-ds serve-reward` answers) and the other-tokenizer path encode every response
    cut = RewardBatch(prompts, responses, [{}] * 6, *rollout(tok, prompts, responses, ended=False))
    assert ModelReward(rm, tok, tok, micro_batch_size=4, max_prompt_tokens=24, max_new_tokens=16)(cut).tolist() == \
        pytest.approx(got.tolist(), abs=1e-5)
    assert got.tolist() == pytest.approx(RewardScorer(models["gpt2_rm"]).score(prompts, responses), abs=1e-5)

    # another tokenizer: decoded and re-encoded as RM training encoded texts -> the offline scorer's numbers
    scorer = RewardScorer(models["llama_rm"])
    other = ModelReward(scorer.model, tok, scorer.tokenizer, micro_batch_size=4, max_prompt_tokens=24,
                        max_new_tokens=16)(b)
    assert other.tolist() == pytest.approx(scorer.score(prompts, responses), abs=1e-5)


# ---- the HTTP client against scripted servers ------------------------------------------------------------------------


class Scripted:
    """A local HTTP server answering POST /score with the next scripted (status, body, delay) per request."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                owner.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body, delay = owner.answers.pop(0) if len(owner.answers) > 1 else owner.answers[0]
                time.sleep(delay)
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def scores_of(request):
    return {"scores": [float(len(r)) for r in request["responses"]]}


def test_remote_batches_and_recovers_from_server_errors(caplog):
    with Scripted([(503, {"error": "busy"}, 0), (500, "oops", 0), (200, {"scores": [1, 2]}, 0),
                   (200, {"scores": [3.5]}, 0)]) as server:
        caplog.set_level(logging.WARNING, logger="rlhf_ds")
        reward = RemoteReward(server.url + "/", timeout_s=5, retries=3, backoff_s=0.01, batch_size=2)
        assert reward(batch("abc", ["x", "yy", "zzz"])).tolist() == [1.0, 2.0, 3.5]
    assert [r["responses"] for r in server.requests] == [["x", "yy"]] * 3 + [["zzz"]]
    assert server.requests[0]["prompts"] == ["a", "b"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "HTTP 503 (busy)" in warnings[0] and "retry 2 of 3" in warnings[1]


@pytest.mark.parametrize("answer, match", [
    ((200, {"scores": [1.0]}, 0), r"returned 1 scores for 2 responses"),
    ((200, "<html>", 0), r"not JSON: b'<html>'"),
    ((200, {"score": [1, 2]}, 0), r"without a 'scores' list"),
    ((200, '{"scores": [1, NaN]}', 0), r"bad score at index 1: nan"),
    ((400, {"error": "'prompts' must be a list"}, 0), r"refused the request: HTTP 400 \('prompts' must be a list\)"),
])
def test_a_wrong_answer_is_not_retried(answer, match):
    with Scripted([answer]) as server:
        with pytest.raises(RewardError, match=rf"reward server {server.url} .*{match}"):
            RemoteReward(server.url, timeout_s=5, retries=3, backoff_s=0.01)(batch("ab", "xy"))
    assert len(server.requests) == 1


def test_a_server_too_slow_times_out_after_bounded_retries(caplog):
    with Scripted([(200, {"scores": [1.0]}, 1.0)]) as server:
        t0 = time.time()
        gave_up = rf"reward server {server.url} gave no answer after 2 attempts: .*timed out"
        with pytest.raises(RewardError, match=gave_up):
            RemoteReward(server.url, timeout_s=0.2, retries=1, backoff_s=0.01)(batch("a", "x"))
        assert time.time() - t0 < 1.5
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_remote_url_must_be_http():
    for url in ("file:///etc/passwd", "127.0.0.1:8000", "ftp://host/x"):
        with pytest.raises(ConfigError, match="reward.url"):
            RemoteReward(url)


# ---- rlhf-ds serve-reward --------------------------------------------------------------------------------------------


def post(url: str, body: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_reward_scores_refuses_bad_requests_and_stops_on_sigterm(models, tmp_path, caplog):
    import urllib.request

    from rlhf_ds.models.scalar_head import RewardScorer

    server = start_reward_server(models["gpt2_rm"], str(tmp_path / "server.log"), 0, "--batch-size", "3")
    proc, url = server.proc, server.url
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok", "model": models["gpt2_rm"]}

        prompts, responses = texts(7)
        responses[3] = ""  # a policy may answer nothing
        # the server's limits fit the model's 96 positions; the texts are far shorter, so these are the same numbers
        local = RewardScorer(models["gpt2_rm"], max_prompt_tokens=48, max_seq_len=96).score(prompts, responses)
        remote = RemoteReward(url, timeout_s=30, retries=0, batch_size=4)(batch(prompts, responses))
        assert remote.tolist() == pytest.approx(local, abs=1e-5)
        assert len(set(local)) == 7  # real, distinct scores

        for body, match in ((b"not json", "not JSON"),
                            (b'{"prompts": ["a"], "responses": ["x", "y"]}', "1 prompts but 2"),
                            (b'{"prompts": ["a"], "responses": [3]}', r"'responses'\[0\] is a int"),
                            (b'["a"]', "must be an object")):
            status, answer = post(f"{url}/score", body)
            assert status == 400 and re.search(match, answer["error"]), (body, answer)
        assert post(f"{url}/nothing", b"{}")[0] == 404
        assert post(f"{url}/score", b'{"prompts": [], "responses": []}') == (200, {"scores": []})
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "rlhf-ds serve-reward: stopped" in rest

    # the server is gone: every attempt is refused, each retry is logged, then one error naming the URL
    caplog.set_level(logging.WARNING, logger="rlhf_ds")
    t0 = time.time()
    with pytest.raises(RewardError, match=rf"reward server {url} gave no answer after 4 attempts: .*[Rr]efused"):
        RemoteReward(url, timeout_s=2, retries=3, backoff_s=0.02)(batch(["p"], ["r"]))
    assert time.time() - t0 < 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all(url in w for w in warnings)


def test_serve_reward_refuses_a_folder_without_a_head_and_a_taken_port(models, capsys):
    assert cli.main(["serve-reward", models["gpt2"], "--port", "0"]) == 2
    assert "not a reward model" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve-reward", models["gpt2_rm"], "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---- serve-reward bounded in work, connections and time; the token (issue #22) ---------------------------------------

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded(models, tmp_path_factory):
    """A server with a token and small limits: 1 worker, 2 connections, reads idle for 1 s closed, 16 texts."""
    root = tmp_path_factory.mktemp("guarded_server")
    token_file = write(root / "token", TOKEN + "\n")
    server = start_reward_server(models["gpt2_rm"], str(root / "server.log"), 0, "--token-file", token_file,
                                 "--workers", "1", "--max-connections", "2", "--read-timeout", "1",
                                 "--max-texts", "16")
    yield server, token_file
    server.stop()


def post_as(url: str, body: bytes, token: str | None = None, timeout: float = 10) -> tuple[int, dict]:
    """POST with an optional bearer token -> (status, JSON answer)."""
    import urllib.error
    import urllib.request

    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


SMALL_BODY = json.dumps({"prompts": ["human : describe the red fox . assistant :"],
                         "responses": ["the fox ."]}).encode()


def test_serve_reward_answers_nested_json_with_400(guarded):
    server, _ = guarded
    for body in (b"[" * 100_000 + b"]" * 100_000,
                 b'{"prompts": ' + b"[" * 3000 + b"]" * 3000 + b', "responses": []}',
                 b'{"prompts": [' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b'], "responses": ["x"]}'):
        status, answer = post_as(f"{server.url}/score", body, TOKEN)
        assert status in (400, 413), (body[:40], answer)  # nested too deeply, or more values than 16 texts need
        assert re.search(r"nested too deeply|JSON values", answer["error"])
    assert post_as(f"{server.url}/score", b"[" * 100_000 + b"]" * 100_000, TOKEN)[0] == 400
    assert post_as(f"{server.url}/score", SMALL_BODY, TOKEN)[0] == 200  # its thread is alive


def test_serve_reward_token_401_without_it_and_the_client_reads_reward_token_file(models, guarded, tmp_path, caplog):
    from rlhf_ds.config import load_config
    from rlhf_ds.models.scalar_head import RewardScorer
    from rlhf_ds.rewards import build_reward

    server, token_file = guarded
    url = server.url
    for token, code in ((None, 401), ("wrong", 401), (TOKEN[:-1], 401), (TOKEN + "x", 401), (TOKEN, 200)):
        assert post_as(f"{url}/score", SMALL_BODY, token)[0] == code, token
    status, answer = post_as(f"{url}/score", SMALL_BODY, None)
    assert "reward.token_file" in answer["error"]
    with urllib_open(f"{url}/health") as r:  # liveness stays open; the model's folder only with the token
        assert json.loads(r.read()) == {"status": "ok"}

    prompts, responses = texts(5)
    local = RewardScorer(models["gpt2_rm"], max_prompt_tokens=48, max_seq_len=96).score(prompts, responses)
    cfg = load_config("ppo", None, ["reward.model=null", f"reward.url={url}", f"reward.token_file={token_file}",
                                    "reward.retries=0", f"output_dir={tmp_path / 'run'}"])
    total, _ = build_reward(cfg, None, None, None)(batch(prompts, responses))
    assert total.tolist() == pytest.approx(local, abs=1e-5)

    # without the token, or with another one: one error naming the key, not retried
    caplog.set_level(logging.WARNING, logger="rlhf_ds")
    with pytest.raises(RewardError, match=r"HTTP 401 .*set reward.token_file to a file holding the token"):
        RemoteReward(url, timeout_s=10, retries=3, backoff_s=0.01)(batch(["p"], ["r"]))
    other = write(tmp_path / "other", "another-token")
    with pytest.raises(RewardError, match=rf"HTTP 401 \(wrong token\): the token in reward.token_file \({other}\)"):
        RemoteReward(url, timeout_s=10, retries=3, backoff_s=0.01, token_file=other)(batch(["p"], ["r"]))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    for bad, match in ((tmp_path / "missing", "cannot read it"), (write(tmp_path / "empty", " \n"), "expected one")):
        with pytest.raises(ConfigError, match=rf"reward.token_file {bad}: {match}"):
            RemoteReward(url, token_file=str(bad))
        with pytest.raises(ConfigError, match=rf"reward.token_file {bad}: {match}"):  # at load, before any rank starts
            load_config("ppo", None, ["reward.model=null", f"reward.url={url}", f"reward.token_file={bad}"])
    with pytest.raises(ConfigError, match="reward.token_file is the token for a reward server"):
        load_config("ppo", None, ["reward.model=null", f"reward.function={RULES}:on_topic",
                                  f"reward.token_file={token_file}"])


def urllib_open(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=10)


def test_serve_reward_past_its_connection_cap_answers_503(guarded):
    server, _ = guarded
    time.sleep(0.3)  # the previous test's connections are closed
    head = f"POST /score HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{".encode()
    held = []
    try:  # --max-connections 2, --workers 1: two requests still arriving, one read by the worker, one waiting for it
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            held[-1].sendall(head)
        time.sleep(0.2)
        status, answer = post_as(f"{server.url}/score", SMALL_BODY, TOKEN)
        assert status == 503 and "--max-connections" in answer["error"]
        with pytest.raises(RewardError, match=r"gave no answer after 1 attempts: HTTP 503 \(server busy"):
            RemoteReward(server.url, timeout_s=10, retries=0, token_file=guarded[1])(batch(["p"], ["r"]))
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while post_as(f"{server.url}/score", SMALL_BODY, TOKEN)[0] != 200:  # room again once they are gone
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_serve_reward_cuts_huge_texts_before_tokenising(models, guarded):
    from rlhf_ds.models.scalar_head import RewardScorer

    server, _ = guarded
    prompt = "the tree is tall . " * ((4 << 20) // 19) + "human : describe the red fox . assistant :"  # 4 MiB
    response = "the fox runs fast and the sun is warm . " * ((20 << 20) // 40)  # 20 MiB
    t0 = time.monotonic()
    status, answer = post_as(f"{server.url}/score", json.dumps({"prompts": [prompt], "responses": [response]}).encode(),
                             TOKEN, timeout=15)  # today's path tokenises 24 MiB whole first: minutes
    took = time.monotonic() - t0
    # what the scorer makes of the same texts cut by tokens (4,000 characters are ~1,000 tokens, far past 48 and 96)
    cut = RewardScorer(models["gpt2_rm"], max_prompt_tokens=48, max_seq_len=96).score([prompt[-4000:]],
                                                                                      [response[:4000]])
    assert status == 200 and answer["scores"] == pytest.approx(cut, abs=1e-5), (status, answer, took)
    seventeen = json.dumps({"prompts": ["p"] * 17, "responses": ["r"] * 17}).encode()  # --max-texts 16
    status, answer = post_as(f"{server.url}/score", seventeen, TOKEN)
    assert status == 413 and "--max-texts" in answer["error"]


def test_cut_texts_keep_every_token_the_scorer_keeps(models):
    import random

    from rlhf_ds.data.features import pair_ids
    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.rewards.server import char_bounds, cut_texts

    tok = load_tokenizer(models["gpt2_rm"])
    words = " ".join(p + " " + r for p, r in zip(*texts(50))).split()
    rng = random.Random(0)
    for max_prompt, max_seq in ((48, 96), (8, 16)):
        prompt_chars, response_chars = char_bounds(tok, max_prompt, max_seq)
        lengths = [rng.randrange(10, 3 * response_chars) for _ in range(40)]
        prompts = [" ".join(rng.choice(words) for _ in range(n // 4)) for n in lengths]
        responses = [" ".join(rng.choice(words) for _ in range(n // 4)) + "ü€" * (n % 3) for n in reversed(lengths)]
        cut_p, cut_r = cut_texts(prompts, responses, prompt_chars, response_chars)
        assert sum(a != b for a, b in zip(prompts + responses, cut_p + cut_r)) >= 20  # most long ones were cut
        assert pair_ids(tok, cut_p, cut_r, max_prompt, max_seq) == \
            pair_ids(tok, prompts, responses, max_prompt, max_seq)


def test_serve_reward_closes_idle_connections_and_stalled_reads(guarded):
    server, _ = guarded
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:  # --read-timeout 1
        t0 = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server
        assert 0.9 < time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
        stalled.sendall(f"POST /score HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{"
                        .encode())
        t0 = time.monotonic()
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 408 ") and b"--read-timeout" in answer
        assert 0.9 < time.monotonic() - t0 < 5


@pytest.fixture(scope="module")
def one_worker(models, tmp_path_factory):
    """A server without a token: 1 worker, 2 s per request (--read-timeout stays 10 s)."""
    root = tmp_path_factory.mktemp("one_worker_server")
    server = start_reward_server(models["gpt2_rm"], str(root / "server.log"), 0, "--workers", "1",
                                 "--request-timeout", "2")
    yield server
    server.stop()


def read_answer(conn: socket.socket) -> tuple[bytes, dict]:
    """(status line and headers, JSON body) of a raw connection's answer, read until the server closes it."""
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body, answer
    return head, json.loads(body)


def test_serve_reward_requests_still_arriving_hold_no_worker(one_worker):
    server = one_worker
    assert post_as(f"{server.url}/score", SMALL_BODY)[0] == 200  # the model has scored once
    stalled = []
    try:  # more clients than --workers 1, each stalled after a few bytes of its request line
        for _ in range(4):
            stalled.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            stalled[-1].sendall(b"POST /sc")
        time.sleep(0.3)  # the server has seen their bytes
        t0 = time.monotonic()
        status, answer = post_as(f"{server.url}/score", SMALL_BODY, timeout=5)
        took = time.monotonic() - t0
        # before: each stalled client held the one worker until its --request-timeout (2 s), the request queued behind
        assert status == 200 and len(answer["scores"]) == 1 and took < 1.0, (status, answer, took)
        # the headers the server buffers are bounded: past 64 KiB, 431
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as long:
            long.sendall(b"GET /health HTTP/1.0\r\nX-Long: " + b"a" * 70_000)
            head, answer = read_answer(long)
        assert head.startswith(b"HTTP/1.0 431 ") and "64 KiB" in answer["error"], (head, answer)
    finally:
        for s in stalled:
            s.close()


def test_serve_reward_answers_503_to_a_request_past_its_deadline_in_the_queue(one_worker):
    server = one_worker
    head = b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{"
    stop = threading.Event()

    def trickle(conn):  # a body arriving a byte at a time: the worker reads it until the request's deadline (2 s)
        while not stop.wait(0.1):
            try:
                conn.sendall(b" ")
            except OSError:
                return

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as late:
        slow.sendall(head)
        sender = threading.Thread(target=trickle, args=(slow,), daemon=True)
        sender.start()
        try:
            time.sleep(0.3)
            late.sendall(head)  # whole headers, part of a body: it waits for the worker past its deadline
            t0 = time.monotonic()
            late_head, late_answer = read_answer(late)
            took = time.monotonic() - t0
        finally:
            stop.set()
            sender.join()
        slow_head, slow_answer = read_answer(slow)
    # before: both connections were shut down at their deadlines without an answer (the client saw a reset)
    for head_, answer in ((late_head, late_answer), (slow_head, slow_answer)):
        assert head_.startswith(b"HTTP/1.0 503 ") and b"\r\nRetry-After: 1\r\n" in head_, (head_, answer)
        assert "--request-timeout (2 s)" in answer["error"], answer
    assert 1.2 < took < 5, took
