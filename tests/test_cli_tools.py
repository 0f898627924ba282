"""`rlhf-ds generate / score / eval / plan` plumbing on the tiny pretrained model (no SFT/RM/PPO needed): prompt formats,
batch invariance of scores, a policy against itself, error messages, the lazy planner import, argv handling.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env
from rlhf_ds import cli
from rlhf_ds.data.builtin_task import BuiltinTask


def load_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_generate_reads_every_prompt_format(tiny_base, tmp_path):
    prompts = list(BuiltinTask(0).eval_prompt_set[:4])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": p} for p in prompts])
    question = write_jsonl(tmp_path / "q.jsonl", [{"question": p} for p in prompts])
    outs = {}
    for name, src in (("plain", plain), ("question", question)):
        out = tmp_path / f"{name}.out.jsonl"
        assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-new-tokens", "10", "--batch-size", "3"]) == 0
        outs[name] = load_jsonl(out)
    assert [r["prompt"] for r in outs["plain"]] == prompts  # input order kept (batches are sorted by length inside)
    # the input's columns come back too: a question row keeps its question beside the prompt it was rendered to
    assert outs["question"] == [{"question": p, **r} for p, r in zip(prompts, outs["plain"])]
    for r in outs["plain"]:
        assert set(r) == {"prompt", "response", "response_tokens", "eos"}
        assert 1 <= r["response_tokens"] <= 10 and (r["eos"] or r["response_tokens"] == 10)
    # a chat prompt (messages) is rendered Human/Assistant style for a tokenizer without a chat template
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "describe the fox ."}]}])
    out = tmp_path / "chat.out.jsonl"
    assert cli.main(["generate", tiny_base, chat, "-o", str(out), "--max-new-tokens", "4"]) == 0
    assert load_jsonl(out)[0]["prompt"] == "\n\nHuman: describe the fox .\n\nAssistant:"


def test_greedy_generation_does_not_depend_on_batching(tiny_base, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in BuiltinTask(0).eval_prompt_set[:6]])
    results = []
    for bs in ("1", "6"):
        out = tmp_path / f"b{bs}.jsonl"
        assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-new-tokens", "12", "--batch-size", bs]) == 0
        results.append([r["response"] for r in load_jsonl(out)])
    assert results[0] == results[1]


def test_score_formats_and_batch_invariance(tiny_base, tmp_path):
    """Any causal-LM folder scores (a fresh seeded head); scores do not depend on the batch or the input format."""
    from rlhf_ds.models.scalar_head import RewardScorer

    prompts = list(BuiltinTask(0).eval_prompt_set[:5])
    responses = ["the fox is calm .", "it is warm and soft .", "the the", "a cat .", "the river flows slowly ."]
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": r} for p, r in zip(prompts, responses)])
    scores = {}
    for name, src, bs in (("pr1", pr, "1"), ("pr5", pr, "5"), ("pc", pc, "2")):
        out = tmp_path / f"{name}.scores.jsonl"
        assert cli.main(["score", tiny_base, src, "-o", str(out), "--batch-size", bs]) == 0
        rows = load_jsonl(out)
        assert [(r["prompt"], r["response"]) for r in rows] == list(zip(prompts, responses))
        scores[name] = [r["score"] for r in rows]
    assert scores["pr1"] == pytest.approx(scores["pr5"], abs=1e-5)
    assert scores["pc"] == pytest.approx(scores["pr5"], abs=1e-5)
    direct = RewardScorer(tiny_base).score(prompts, responses)
    assert scores["pr5"] == pytest.approx(direct, abs=1e-5)
    assert len(set(round(s, 4) for s in scores["pr5"])) > 1  # the scores do depend on the text


def test_eval_of_a_policy_against_itself(tiny_base, tmp_path, capsys):
    """The same model as SFT and PPO policy: the j-th sample of both comes from the same seed stream, so the answers are
    identical, every pair ties and the win rate is 0.5 (4 samples per prompt by default)."""
    out = str(tmp_path / "eval")
    assert cli.main(["eval", f"output_dir={out}", f"sft_model={tiny_base}", f"ppo_model={tiny_base}",
                     f"reward_model={tiny_base}", "max_prompts=12", "generation.max_new_tokens=10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.load(open(os.path.join(out, "results.json")))
    assert printed["win_rate_ppo_vs_sft"] == res["win_rate_ppo_vs_sft"] == 0.5
    assert res["rm_win_rate_ppo_vs_sft"] == 0.5
    assert res["gold_reward"]["sft"] == res["gold_reward"]["ppo"]
    samples = load_jsonl(os.path.join(out, "samples.jsonl"))
    task = BuiltinTask(0)  # the ceiling: the task's near-optimal responses
    assert res["gold_reward"]["best"] == pytest.approx(sum(task.best_gold(s["prompt"]) for s in samples) / 48)
    assert res["gold_reward"]["best"] > res["gold_reward"]["sft"]
    assert res["n_prompts"] == 12 and res["samples_per_prompt"] == 4
    assert len(samples) == 48 and all(s["sft_response"] == s["ppo_response"] for s in samples)
    task_prompts = [r["prompt"] for r in load_jsonl(os.path.join(out, "data", "eval_prompts.jsonl"))][:12]
    assert [s["prompt"] for s in samples] == task_prompts * 4
    assert len({s["sft_response"] for s in samples}) > 12  # sampled: the 4 answers to a prompt differ
    assert os.path.isfile(os.path.join(out, "metrics.jsonl")) and os.path.isfile(os.path.join(out, "config.yaml"))

    # one policy alone, custom prompts: no gold reward, no win rate
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello there"}, {"prompt": "human : hi . assistant :"}])
    out2 = str(tmp_path / "eval2")
    assert cli.main(["eval", f"output_dir={out2}", f"sft_model={tiny_base}", "ppo_model=null", "reward_model=null",
                     f"prompts={src}", "generation.max_new_tokens=5"]) == 0
    res = json.load(open(os.path.join(out2, "results.json")))
    assert res["n_prompts"] == 2 and res["gold_reward"] is None and res["win_rate_ppo_vs_sft"] is None
    assert res["rm_score"] is None and set(load_jsonl(os.path.join(out2, "samples.jsonl"))[0]) == {"prompt", "sft_response"}


def test_tool_errors_are_reported(tiny_base, tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    assert cli.main(["generate", str(tmp_path / "missing"), src, "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt column"}])
    assert cli.main(["generate", tiny_base, bad, "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "cannot tell the prompt format" in capsys.readouterr().err
    assert cli.main(["score", tiny_base, src, "-o", str(tmp_path / "s.jsonl")]) == 2  # no responses
    assert not os.path.exists(tmp_path / "o.jsonl") and not os.path.exists(tmp_path / "s.jsonl")
    assert cli.main(["eval", "output_dir=x", "sft_model=null", "ppo_model=null"]) == 2
    assert "eval needs sft_model, ppo_model or dpo_model" in capsys.readouterr().err
    assert cli.main(["generate", tiny_base, src, "-o", str(tmp_path / "o.jsonl"), "--temperature", "0",
                     "--do-sample"]) == 2


def test_plan_is_wired_lazily(capsys):
    code = ("import sys; from rlhf_ds import cli; cli.build_parser('sft'); cli.build_parser(None); "
            "print('rlhf_ds.planner' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
    assert cli.main(["plan", "--actor", "125M", "--gpus-per-node", "2", "--gpu-memory-gb", "80", "--json"]) in (0, 1)
    out = capsys.readouterr().out
    assert out.strip().startswith("{") and json.loads(out)


def test_argv_handling():
    assert cli._without_launch_options(["sft", "--num-gpus", "2", "train.epochs=2", "--master-port=1", "x=2"]) == [
        "sft", "train.epochs=2", "x=2"]
    with pytest.raises(SystemExit):
        cli.main(["sft", "--num-gpus", "2", "--bogus"])


def test_generate_truncates_or_skips_overlong_prompts_and_names_the_rows(tiny_base, tmp_path, capsys):
    """One over-long prompt no longer aborts the file; the default limit comes from the model's positions."""
    task = BuiltinTask(0)
    short = list(task.eval_prompt_set[:3])
    long = "human : " + " ".join(["describe the red fox ."] * 60) + " assistant :"
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": short[0]}, {"prompt": long}, {"prompt": short[1]},
                                             {"prompt": short[2]}])
    positions = 96  # tiny_base's arch.max_positions
    out = tmp_path / "t.jsonl"
    assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-new-tokens", "16"]) == 0
    err = capsys.readouterr().err
    assert f"1 of 4 prompts in {src} are longer than {positions - 16} tokens and were left-truncated to fit: row 2" in err
    rows = load_jsonl(out)
    assert [r["prompt"] for r in rows] == [short[0], long, *short[1:]]
    out = tmp_path / "s.jsonl"
    assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-new-tokens", "16", "--max-prompt-tokens", "40",
                     "--prompt-overflow", "skip"]) == 0
    assert f"1 of 4 prompts in {src} are longer than 40 tokens and were skipped: row 2" in capsys.readouterr().err
    assert [r["prompt"] for r in load_jsonl(out)] == [short[0], *short[1:]]
    # a limit that leaves no room to generate: exit 2, the flag spelled as the user typed it, nothing written
    out = tmp_path / "none.jsonl"
    assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-prompt-tokens", "200"]) == 2
    assert f"--max-prompt-tokens 200 leaves no room to generate within the model's {positions} positions" in \
        capsys.readouterr().err
    assert not out.exists()


def test_score_keeps_every_input_column(tiny_base, tmp_path):
    task = BuiltinTask(0)
    rows = [{"id": f"q{i}", "prompt": p, "response": "it is a good fox .", "reference": "gold", "meta": {"k": i}}
            for i, p in enumerate(task.eval_prompt_set[:3])]
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", tiny_base, write_jsonl(tmp_path / "in.jsonl", rows), "-o", str(out)]) == 0
    got = load_jsonl(out)
    assert len(got) == 3
    for row, scored in zip(rows, got):
        assert {k: scored[k] for k in row} == row
        assert isinstance(scored["score"], float)


def test_generate_keeps_every_input_column(tiny_base, tmp_path, capsys):
    """Each output row is its input row whole (a reference answer, ids, nested metadata, the chat itself) plus the
    rendered prompt and the generation; an input column generate writes itself is kept as input_<name>; with several
    samples the rows stay in input order, sample by sample, even for repeated prompts."""
    task = BuiltinTask(0)
    p = list(task.eval_prompt_set[:3])
    rows = [{"id": "a", "prompt": p[0], "answer": "the fox is calm .", "meta": {"k": [1, 2]}},
            {"id": "b", "prompt": p[1], "answer": None, "response": "a reference", "eos": "x"},
            {"id": "c", "prompt": p[0], "answer": "again"}]  # the same prompt as row a
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-new-tokens", "6", "--num-samples", "2",
                     "--do-sample", "--seed", "3"]) == 0
    assert "input columns eos, response are kept as input_eos, input_response (generate writes its own)" in \
        capsys.readouterr().err
    got = load_jsonl(out)
    assert [(r["id"], r["sample"]) for r in got] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    generated = {"prompt", "response", "response_tokens", "eos", "sample"}
    for r in got:
        row = next(x for x in rows if x["id"] == r["id"])
        kept = {("input_" + k if k in ("response", "eos") else k): v for k, v in row.items()}
        assert {k: r[k] for k in kept} == kept and set(r) == set(kept) | generated
        assert r["prompt"] == row["prompt"] and 1 <= r["response_tokens"] <= 6
    assert got[0]["meta"] == {"k": [1, 2]} and got[2]["input_response"] == "a reference" and got[2]["answer"] is None
    # a chat row keeps its messages
    chat = [{"role": "user", "content": "describe the fox ."}]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat, "answer": "4"}])
    assert cli.main(["generate", tiny_base, src, "-o", str(out), "--max-new-tokens", "3"]) == 0
    (r,) = load_jsonl(out)
    assert (r["messages"], r["answer"], r["prompt"]) == (chat, "4", "\n\nHuman: describe the fox .\n\nAssistant:")


def test_single_process_commands_set_torch_threads_from_the_cores(tiny_base, tmp_path, capsys, monkeypatch):
    """RLHF_DS_THREADS when set, else the usable cores (CPU affinity); said once, as one INFO line; a bad value exits
    2."""
    import torch

    from rlhf_ds.engine import launcher

    before = torch.get_num_threads()
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "human : hi . assistant :"}])
    out = str(tmp_path / "o.jsonl")
    try:
        monkeypatch.delenv("RLHF_DS_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one usable core of however many
        assert launcher.usable_cores() == 1 and launcher.threads_per_process(1) == 1
        torch.set_num_threads(2)
        assert cli.main(["generate", tiny_base, src, "-o", out, "--max-new-tokens", "2"]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "torch threads" in line]
        assert torch.get_num_threads() == 1 and len(lines) == 1
        assert lines[0].endswith("[rank0] INFO torch threads: 1 (from 1 usable cores; set RLHF_DS_THREADS to change)")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
        assert launcher.threads_per_process(1) == 6 and launcher.threads_per_process(4) == 1
        assert launcher.threads_per_process(2) == 3
        monkeypatch.setenv("RLHF_DS_THREADS", "2")
        assert cli.main(["score", tiny_base, write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}]),
                         "-o", str(tmp_path / "s.out.jsonl")]) == 0
        assert torch.get_num_threads() == 2 and launcher.threads_per_process(4) == 2
        assert "INFO torch threads: 2 (from $RLHF_DS_THREADS;" in capsys.readouterr().err
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv("RLHF_DS_THREADS", bad)
            assert cli.main(["generate", tiny_base, src, "-o", out, "--max-new-tokens", "2"]) == 2
            assert f"rlhf-ds generate: RLHF_DS_THREADS={bad!r}: expected a whole number of threads >= 1" in \
                capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_step_run_as_one_process_takes_its_threads_from_its_usable_cores(tmp_path):
    """`python -m rlhf_ds.cli <step>` on one core of the machine (taskset): one INFO line, the first, says 1 thread,
    before the step starts (here it stops at once: no model at the default path, exit 2)."""
    import shutil

    if shutil.which("taskset") is None:
        pytest.skip("needs taskset")
    env = {k: v for k, v in cli_env(1).items() if k != "RLHF_DS_THREADS"}
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "rlhf_ds.cli", "sft",
                           f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'missing.jsonl'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "torch threads" in line]
    assert len(lines) == 1 and lines[0].endswith("INFO torch threads: 1 (from 1 usable cores; set RLHF_DS_THREADS to "
                                                 "change)")
    assert proc.stderr.splitlines()[0] == lines[0] and "rlhf-ds sft: tokenizer folder not found" in proc.stderr
