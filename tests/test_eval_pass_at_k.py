"""`rlhf-ds eval reward_function=...`: the pass@k estimator by hand, and an eval run on the tiny pretrained model whose
accuracy, pass@k and greedy accuracy are recomputed from samples.jsonl; config errors exit with status 2."""
from __future__ import annotations

import json
import math
import os

import pytest

from conftest import run_cli
from rlhf_ds import cli
from rlhf_ds.data.builtin_task import BuiltinTask
from rlhf_ds.steps.evaluate import mean_pass_at_k, pass_at_k

# a reward from a column of the prompt rows: how often the row's `needle` occurs in the response (a TypeError, hence a
# failed run, if the column did not reach the function)
REWARD_FN = '''
def count_needle(prompts, responses, needle, **kwargs):
    assert len(prompts) == len(responses) == len(needle)
    return [float(r.count(n)) for r, n in zip(responses, needle)]
'''
NEEDLES = ["e", "a", "o", "t", "s", "the"]  # one per prompt: some often there, some rarely


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 2, 2, 1 - 1 / 6), (4, 0, 1, 0.0), (4, 0, 3, 0.0), (4, 4, 1, 1.0),
    (4, 4, 4, 1.0), (5, 2, 3, 0.9), (10, 3, 5, 1 - 21 / 252), (10, 3, 8, 1.0), (1, 1, 1, 1.0), (1, 0, 1, 0.0),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_and_refuses_bad_input():
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200, abs=1e-12)
    # products, not binomials (C(1000, 100) has 140 digits), agree with the exact value
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), abs=1e-12)
    for n, c, k in ((4, 1, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, -1), (4, 1, 0), (4, 1.0, 1), (4, True, 1)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert mean_pass_at_k([[True, False, False, False], [True, True, False, False]], 2) == pytest.approx((0.5 + 5 / 6) / 2)
    assert mean_pass_at_k([], 1) is None


def _load_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def needle_prompts(tmp_path):
    fn = tmp_path / "needle_reward.py"
    fn.write_text(REWARD_FN)
    prompts = list(BuiltinTask(0).eval_prompt_set[: len(NEEDLES)])
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "needle": n}) + "\n" for p, n in zip(prompts, NEEDLES)))
    return f"{fn}:count_needle", str(src), prompts


def test_eval_pass_at_k_from_a_reward_function(tiny_base, tmp_path, needle_prompts):
    """One policy, no reward model: sampled answers, 4 per prompt, scored by a function of a prompt column; every figure
    is recomputed from samples.jsonl (sample j of prompt i is line j * n + i; greedy answers on the first n lines)."""
    spec, src, prompts = needle_prompts
    n, spp, threshold = len(prompts), 4, 2.0
    out = str(tmp_path / "eval")
    assert cli.main(["eval", f"output_dir={out}", f"sft_model={tiny_base}", "ppo_model=null", "reward_model=null",
                     f"reward_function={spec}", f"prompts={src}", f"samples_per_prompt={spp}", "pass_k=[1,2,4]",
                     f"pass_threshold={threshold}", "generation.max_new_tokens=8"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    samples = _load_jsonl(os.path.join(out, "samples.jsonl"))
    assert len(samples) == n * spp and [s["prompt"] for s in samples] == prompts * spp
    for j, s in enumerate(samples):  # the row's own column reached the function
        assert s["sft_function_reward"] == s["sft_response"].count(NEEDLES[j % n])
    rewards = [s["sft_function_reward"] for s in samples]
    passed = [r >= threshold for r in rewards]
    assert res["reward_function"] == spec and res["pass_threshold"] == threshold
    assert res["function_reward"]["sft"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-12)
    assert res["accuracy"]["sft"] == pytest.approx(sum(passed) / len(passed), abs=1e-12)
    pak = res["pass_at_k"]["sft"]
    assert set(pak) == {"1", "2", "4"}
    assert pak["1"] == pytest.approx(res["accuracy"]["sft"], abs=1e-12)
    assert pak["1"] <= pak["2"] <= pak["4"]
    per_prompt = [[passed[j * n + i] for j in range(spp)] for i in range(n)]
    assert pak["4"] == pytest.approx(sum(any(p) for p in per_prompt) / n, abs=1e-12)
    assert pak["2"] == pytest.approx(mean_pass_at_k(per_prompt, 2), abs=1e-12)
    # a test that says something: some prompts pass sometimes, not always, so pass@k grows with k
    assert 0 < res["accuracy"]["sft"] < pak["4"] and pak["1"] < pak["2"]
    # the greedy answers: one per prompt, on the first n lines, scored the same way
    greedy = [s["sft_greedy_function_reward"] for s in samples[:n]]
    assert all("sft_greedy_response" not in s for s in samples[n:])
    for i, s in enumerate(samples[:n]):
        assert s["sft_greedy_function_reward"] == s["sft_greedy_response"].count(NEEDLES[i])
    assert res["greedy_accuracy"]["sft"] == pytest.approx(sum(g >= threshold for g in greedy) / n, abs=1e-12)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    logged = {k: v for row in metrics for k, v in row.items()}
    assert logged["eval/pass_at_k/sft/4"] == pytest.approx(pak["4"]) and "eval/greedy_accuracy/sft" in logged


def test_eval_pass_at_k_greedy_generation_two_policies(tiny_base, tmp_path, needle_prompts):
    """Greedy generation (do_sample=false): every sample of a prompt is the greedy answer, so pass@k is the accuracy for
    every k and the greedy accuracy equals it; two policies (the same model) get the same figures; default pass_k."""
    spec, src, prompts = needle_prompts
    out = str(tmp_path / "eval")
    assert cli.main(["eval", f"output_dir={out}", f"sft_model={tiny_base}", f"ppo_model={tiny_base}",
                     "reward_model=null", f"reward_function={spec}", f"prompts={src}", "samples_per_prompt=2",
                     "generation.do_sample=false", "generation.max_new_tokens=8", "pass_threshold=1"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    samples = _load_jsonl(os.path.join(out, "samples.jsonl"))
    for name in ("sft", "ppo"):
        assert set(res["pass_at_k"][name]) == {"1", "2"}  # empty pass_k: 1 and samples_per_prompt
        acc = res["accuracy"][name]
        assert res["pass_at_k"][name] == pytest.approx({"1": acc, "2": acc}, abs=1e-12)
        assert res["greedy_accuracy"][name] == pytest.approx(acc, abs=1e-12)
        assert [s[f"{name}_greedy_response"] for s in samples[: len(prompts)]] == \
               [s[f"{name}_response"] for s in samples[: len(prompts)]]
    assert res["accuracy"]["sft"] == res["accuracy"]["ppo"]


@pytest.mark.parametrize("case", ["k_above_samples", "missing_file", "k_without_function"])
def test_eval_pass_at_k_config_errors(tmp_path, case):
    fn = tmp_path / "r.py"
    fn.write_text(REWARD_FN)
    args = {"k_above_samples": [f"reward_function={fn}:count_needle", "samples_per_prompt=4", "pass_k=[5]"],
            "missing_file": [f"reward_function={tmp_path / 'nope.py'}:count_needle"],
            "k_without_function": ["pass_k=[1]"]}[case]
    proc = run_cli(["eval", f"output_dir={tmp_path / 'eval'}", "reward_model=null", *args], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = {"k_above_samples": "eval.pass_k [5]", "missing_file": "no such file",
                "k_without_function": "eval.pass_k"}[case]
    assert "config error" in proc.stderr and expected in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "eval" / "results.json")
