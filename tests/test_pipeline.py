"""`rlhf-ds pipeline` end to end with tiny settings (pretrain on 1 rank, SFT/RM/PPO on 2 CPU ranks under the deepspeed
launcher, ZeRO-3, final evaluation), wandb offline; what it leaves (summary.json, metrics.jsonl, plots, report.html,
resolved configs, eval samples, wandb runs); `rlhf-ds generate/score/chat` on the models it produced; re-running one
step with a given model; a failing step; the step planning (skip / only / given models) without training.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from conftest import REPO, cli_env, read_metrics
from rlhf_ds import cli
from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.data.builtin_task import BuiltinTask
from rlhf_ds.steps import pipeline
from rlhf_ds.tracking.report import get
from rlhf_ds.tracking.wandb_utils import offline_runs, read_offline_run

STEPS = ("pretrain", "sft", "rm", "ppo", "eval")
TINY = ["pretrain.arch.n_layers=2", "pretrain.arch.hidden=64", "pretrain.arch.n_heads=2", "pretrain.arch.vocab_size=400",
        "pretrain.arch.max_positions=96", "pretrain.train.max_steps=30", "sft.train.max_steps=20",
        "rm.train.max_steps=20", "ppo.ppo.steps=3", "eval.max_prompts=32"]
REQUIRED = ["sft.eval_loss", "rm.eval_accuracy", "rm.bayes_ceiling", "ppo.reward_mean", "ppo.kl",
            "eval.gold_reward.sft", "eval.gold_reward.ppo", "eval.win_rate_ppo_vs_sft",
            *[f"timing.{s}_seconds" for s in STEPS]]
PLOTS = ["lm_loss", "rm_loss", "rm_accuracy", "ppo_reward", "ppo_kl", "ppo_beta", "ppo_diversity", "gold_reward",
         "response_length", "eval_gold", "time_split"]


def pipeline_env() -> dict:
    env = cli_env(threads=1)
    for k in ("OMP_NUM_THREADS", "RLHF_DS_THREADS"):  # the pipeline picks threads per step from its rank count
        env.pop(k, None)
    return env


def run_pipeline(args: list[str], check: bool = True, timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "pipeline", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=pipeline_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def run_dir():
    # outside pytest's numbered tmp folders: a concurrent pytest session prunes old ones while this module still runs
    root = tempfile.mkdtemp(prefix="rlhf_ds_pipeline_")
    run = os.path.join(root, "tinyrun")
    run_pipeline([f"output_dir={run}", *TINY, "tracking.wandb=true", "tracking.wandb_tags=[tiny]"])
    yield run
    shutil.rmtree(root, ignore_errors=True)


# ---- the full run ------------------------------------------------------------------------------------------------------
def test_summary_has_every_figure(run_dir):
    summary = load_json(os.path.join(run_dir, "summary.json"))
    for key in REQUIRED:
        value = get(summary, key)
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{key} = {value!r}"
    assert summary["steps"] == {s: "done" for s in STEPS}
    # the summary is the steps' own figures, not a copy that can drift
    for step in ("sft", "rm", "ppo"):
        assert summary[step] == load_json(os.path.join(run_dir, step, "results.json"))
    assert 0.5 < summary["rm"]["bayes_ceiling"] < 1
    assert 0 <= summary["eval"]["win_rate_ppo_vs_sft"] <= 1
    state = load_json(os.path.join(run_dir, "pipeline.json"))
    assert all(state["steps"][s]["status"] == "done" and state["steps"][s]["exit_code"] == 0 for s in STEPS)


def test_metrics_jsonl_concatenates_the_steps(run_dir):
    top = read_metrics(run_dir)
    parts = [row for s in STEPS for row in read_metrics(os.path.join(run_dir, s))]
    assert top == parts
    assert {r["step_name"] for r in top} == set(STEPS)
    ppo_steps = [r["step"] for r in top if r["step_name"] == "ppo" and "ppo/reward" in r]
    assert ppo_steps == [1, 2, 3]  # log_every=1: one line per PPO iteration
    assert [r["step"] for r in top if r["step_name"] == "sft" and "sft/loss" in r] == [5, 10, 15, 20]


def test_report_and_plots(run_dir):
    made = sorted(f[:-4] for f in os.listdir(os.path.join(run_dir, "plots")))
    assert made == sorted(PLOTS)
    for name in made:
        with open(os.path.join(run_dir, "plots", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    assert page.count("src='data:image/png;base64,") == len(PLOTS)
    samples = load_jsonl(os.path.join(run_dir, "eval", "samples.jsonl"))
    import html

    assert html.escape(samples[0]["prompt"]) in page and html.escape(samples[0]["ppo_response"]) in page


def test_report_regenerates(run_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("model", "critic", "wandb", "data", "init"))
    before = load_json(os.path.join(copy, "summary.json"))
    for f in ("summary.json", "metrics.jsonl", "report.html"):
        os.remove(os.path.join(copy, f))
    shutil.rmtree(os.path.join(copy, "plots"))
    assert cli.main(["report", copy]) == 0
    after = load_json(os.path.join(copy, "summary.json"))
    assert {k: v for k, v in after.items() if k != "run_dir"} == {k: v for k, v in before.items() if k != "run_dir"}
    assert len(os.listdir(os.path.join(copy, "plots"))) == len(PLOTS)
    assert read_metrics(copy) == read_metrics(run_dir)


def test_steps_are_wired_and_configs_saved(run_dir):
    resolved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    d = {s: os.path.join(run_dir, s) for s in STEPS}
    assert resolved["sft"]["model"] == d["pretrain"]
    assert resolved["rm"]["model"] == d["sft"]
    assert resolved["ppo"]["actor"]["model"] == d["sft"] and resolved["ppo"]["reward"]["model"] == d["rm"]
    assert (resolved["eval"]["sft_model"], resolved["eval"]["ppo_model"], resolved["eval"]["reward_model"]) == (
        d["sft"], d["ppo"], d["rm"])
    assert resolved["sft"]["train"]["max_steps"] == 20 and resolved["ppo"]["ppo"]["steps"] == 3  # overrides
    for step in STEPS:
        saved = yaml.safe_load(open(os.path.join(d[step], "config.yaml")))
        assert saved == yaml.safe_load(open(os.path.join(run_dir, "configs", f"{step}.yaml")))
        assert saved["output_dir"] == d[step]
        assert saved["tracking"]["wandb_group"] == "tinyrun" and saved["tracking"]["wandb"] is True
    # SFT, RM, PPO ran on 2 ranks with ZeRO-3 (every model), pretraining on one
    for step in ("sft", "rm", "ppo"):
        assert sorted(os.listdir(os.path.join(d[step], "logs"))) == ["rank0.log", "rank1.log"], step
    assert sorted(os.listdir(os.path.join(d["pretrain"], "logs"))) == ["rank0.log", "rank1.log"]
    assert resolved["sft"]["engine"]["zero_stage"] == resolved["rm"]["engine"]["zero_stage"] == 3
    assert {resolved["ppo"][r]["engine"]["zero_stage"] for r in ("actor", "critic", "reference", "reward")} == {3}


def test_eval_scores_and_win_rate(run_dir):
    res = load_json(os.path.join(run_dir, "eval", "results.json"))
    samples = load_jsonl(os.path.join(run_dir, "eval", "samples.jsonl"))
    assert res["n_prompts"] == 32 and res["samples_per_prompt"] == 4
    assert len(samples) == 32 * 4
    task = BuiltinTask(0)
    held_out = set(task.eval_prompt_set)
    assert all(s["prompt"] in held_out for s in samples)
    for s in samples:  # the gold reward of what each policy said
        assert s["sft_gold_reward"] == pytest.approx(task.gold_reward(s["prompt"], s["sft_response"]))
        assert s["ppo_gold_reward"] == pytest.approx(task.gold_reward(s["prompt"], s["ppo_response"]))
    for name in ("sft", "ppo"):
        assert res["gold_reward"][name] == pytest.approx(sum(s[f"{name}_gold_reward"] for s in samples) / len(samples))
        assert res["rm_score"][name] == pytest.approx(sum(s[f"{name}_rm_score"] for s in samples) / len(samples))
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0
               for p, q in ((s["ppo_gold_reward"], s["sft_gold_reward"]) for s in samples))
    assert res["win_rate_ppo_vs_sft"] == pytest.approx(wins / len(samples))


def test_wandb_offline_runs_hold_the_metrics(run_dir):
    for step in STEPS:
        files = offline_runs(os.path.join(run_dir, step, "wandb"))
        assert len(files) == 1, step
        data = read_offline_run(files[0])
        assert data["run"]["group"] == "tinyrun" and data["run"]["name"] == f"tinyrun-{step}"
        assert data["run"]["job_type"] == step and data["run"]["tags"] == ["tiny"]
        assert data["config"]["output_dir"] == os.path.join(run_dir, step)
        # every number of metrics.jsonl is in the wandb history row of its step
        logged: dict[int, dict] = {}
        for row in read_metrics(os.path.join(run_dir, step)):
            logged.setdefault(row["step"], {}).update(
                {k: v for k, v in row.items() if k not in ("step_name", "step", "time") and isinstance(v, (int, float))})
        history = {}
        for row in data["history"]:
            history.setdefault(row["_step"], {}).update(row)
        assert sorted(history) == sorted(logged), step
        for s, values in logged.items():
            for k, v in values.items():
                assert history[s][k] == pytest.approx(v, rel=1e-6), (step, s, k)
        results = load_json(os.path.join(run_dir, step, "results.json"))
        key = {"pretrain": "eval_loss", "sft": "eval_loss", "rm": "eval_accuracy", "ppo": "reward_mean",
               "eval": "win_rate_ppo_vs_sft"}[step]
        assert data["summary"][key] == pytest.approx(results[key]), step


def test_report_opens_in_headless_chromium(run_dir):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    url = "file://" + os.path.join(run_dir, "report.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--window-size=1400,2400"]
    shot = os.path.join(run_dir, "report_screenshot.png")
    proc = subprocess.run([exe, *flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.getsize(shot) > 50_000  # a rendered page, not a blank one
    dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-3000:]
    # the page's own check after load: every embedded plot decoded
    assert f'data-images-ok="{len(PLOTS)}"' in dom.stdout and 'data-images-broken="0"' in dom.stdout
    assert "Uncaught" not in dom.stderr


# ---- generate / score / chat on the produced models ------------------------------------------------------------------
def test_generate_and_score_match_the_evaluation(run_dir, tmp_path):
    """Seeded sampling `generate` with eval's settings (same prompt order, seed and batches) reproduces eval's PPO
    responses, and `score` reproduces their RM scores."""
    samples = load_jsonl(os.path.join(run_dir, "eval", "samples.jsonl"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s["prompt"]}) + "\n" for s in samples))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "responses.jsonl")
    assert cli.main(["generate", os.path.join(run_dir, "ppo"), str(prompts), "-o", out, "--do-sample", "--seed", "1234",
                     "--batch-size", "32", "--max-new-tokens", "24", "--max-prompt-tokens", "32"]) == 0
    assert os.listdir(out_dir) == ["responses.jsonl"]  # atomic: no temp file left behind
    rows = load_jsonl(out)
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in samples]
    assert [r["response"] for r in rows] == [s["ppo_response"] for s in samples]

    scores = str(tmp_path / "scores.jsonl")
    assert cli.main(["score", os.path.join(run_dir, "rm"), out, "-o", scores]) == 0
    scored = load_jsonl(scores)
    assert [r["score"] for r in scored] == pytest.approx([s["ppo_rm_score"] for s in samples], abs=1e-5)
    raw = str(tmp_path / "raw.jsonl")
    assert cli.main(["score", os.path.join(run_dir, "rm"), out, "-o", raw, "--raw"]) == 0
    offset = load_json(os.path.join(run_dir, "rm", "results.json"))["score_offset"]
    assert [r["score"] - offset for r in load_jsonl(raw)] == pytest.approx([r["score"] for r in scored], abs=1e-5)


def test_generate_sampling_is_seeded(run_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in BuiltinTask(0).eval_prompt_set[:3]))
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = str(tmp_path / f"{name}.jsonl")
        assert cli.main(["generate", os.path.join(run_dir, "sft"), str(prompts), "-o", out, "--do-sample",
                         "--seed", str(seed), "--num-samples", "2", "--max-new-tokens", "12"]) == 0
        runs.append(load_jsonl(out))
    assert len(runs[0]) == 6 and [r["sample"] for r in runs[0]] == [0, 1] * 3
    assert runs[0] == runs[1]
    assert [r["response"] for r in runs[0]] != [r["response"] for r in runs[2]]
    assert all(r["response_tokens"] <= 12 for r in runs[0])


def test_chat_reads_piped_input(run_dir, tmp_path):
    message = "describe the red fox ."
    template = "human : {input} assistant :"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": template.replace("{input}", message)}) + "\n")
    out = str(tmp_path / "r.jsonl")
    assert cli.main(["generate", os.path.join(run_dir, "ppo"), str(prompts), "-o", out, "--max-new-tokens", "16"]) == 0
    expected = load_jsonl(out)[0]["response"]

    cmd = [sys.executable, "-m", "rlhf_ds.cli", "chat", os.path.join(run_dir, "ppo"), "--template", template,
           "--max-new-tokens", "16", "--reward-model", os.path.join(run_dir, "rm"), "--gold-seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(2), input=f"{message}\n\n{message}\n/quit\nnot read\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = [line for line in proc.stdout.splitlines() if line.startswith("model> ")]
    assert len(replies) == 2  # the blank line is skipped, /quit ends before the last line
    gold = BuiltinTask(0).gold_reward(template.replace("{input}", message), expected)
    for reply in replies:
        assert reply.startswith(f"model> {expected}   [rm ")
        assert f"gold {gold:+.3f}" in reply


def test_chat_loop_in_process(run_dir):
    out = io.StringIO()
    from rlhf_ds.config import GenerationConfig
    from rlhf_ds.steps.evaluate import chat_loop

    n = chat_loop(os.path.join(run_dir, "sft"), GenerationConfig(max_new_tokens=8, do_sample=False),
                  stdin=io.StringIO("hello\nworld\n"), stdout=out)
    assert n == 2 and out.getvalue().count("model> ") == 2


# ---- one step again, with a given model; a failing step ---------------------------------------------------------------
def test_only_rm_with_a_given_sft_model(run_dir, tmp_path):
    run = str(tmp_path / "rm_only")
    given = os.path.join(run_dir, "sft")
    run_pipeline([f"output_dir={run}", "only=rm", f"sft_model={given}", "rm.train.max_steps=5"])
    assert sorted(d for d in os.listdir(run) if os.path.isdir(os.path.join(run, d))) == ["configs", "plots", "rm"]
    assert yaml.safe_load(open(os.path.join(run, "rm", "config.yaml")))["model"] == given
    state = load_json(os.path.join(run, "pipeline.json"))
    assert {s: state["steps"][s]["status"] for s in STEPS} == {
        "pretrain": "skip", "sft": "given", "rm": "done", "ppo": "skip", "eval": "skip"}
    summary = load_json(os.path.join(run, "summary.json"))
    assert summary["rm"]["steps"] == 5 and isinstance(summary["rm"]["eval_accuracy"], float)
    assert summary["sft"] == load_json(os.path.join(given, "results.json"))  # the given model's own figures
    assert list(summary["timing"]) == ["rm_seconds", "total_seconds"]
    assert [r["step_name"] for r in read_metrics(run)] == ["rm"] * len(read_metrics(os.path.join(run, "rm")))

    # completed steps are kept with resume_completed_steps: nothing runs, nothing changes
    mtime = os.path.getmtime(os.path.join(run, "rm", "results.json"))
    proc = run_pipeline([f"output_dir={run}", "only=rm", f"sft_model={given}", "resume_completed_steps=true"])
    assert "rm already done" in proc.stderr
    assert os.path.getmtime(os.path.join(run, "rm", "results.json")) == mtime
    assert load_json(os.path.join(run, "summary.json"))["timing"] == summary["timing"]


def test_failing_step_stops_the_pipeline(tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # looks like a model folder, has no weights
    run = str(tmp_path / "fails")
    proc = run_pipeline([f"output_dir={run}", f"sft_model={broken}", "only=rm,ppo", "num_gpus=1"], check=False)
    assert proc.returncode == 1
    assert "step 'rm' failed" in proc.stderr
    state = load_json(os.path.join(run, "pipeline.json"))
    assert state["steps"]["rm"]["status"] == "failed" and state["steps"]["rm"]["exit_code"] != 0
    assert "ppo" not in state["steps"] or state["steps"]["ppo"]["status"] == "skip"
    assert not os.path.exists(os.path.join(run, "ppo"))
    assert os.path.isfile(os.path.join(run, "summary.json"))  # what there is, is still reported


# ---- planning (no training) --------------------------------------------------------------------------------------------
def _plan(tmp_path, *overrides):
    cfg = load_config("pipeline", None, [f"output_dir={tmp_path / 'run'}", *overrides])
    return {p.name: p for p in pipeline.plan(cfg)}, str(tmp_path / "run")


def _fake_model(path) -> str:
    os.makedirs(os.path.join(path, "model"), exist_ok=True)
    with open(os.path.join(path, "model", "config.json"), "w") as f:
        f.write("{}")
    return str(path)


def test_plan_defaults(tmp_path):
    plans, run = _plan(tmp_path)
    assert [p.action for p in plans.values()] == ["run"] * 5
    assert [plans[s].ranks for s in STEPS] == [2, 2, 2, 2, 1]
    assert plans["sft"].cfg.model == f"{run}/pretrain" and plans["rm"].cfg.model == f"{run}/sft"
    assert plans["ppo"].inputs == {"actor": f"{run}/sft", "reward": f"{run}/rm"}
    assert plans["eval"].inputs == {"sft": f"{run}/sft", "ppo": f"{run}/ppo", "reward": f"{run}/rm"}
    pipeline.check_inputs(list(plans.values()))  # every input is made by an earlier step
    # the pipeline's defaults are the steps' own defaults, apart from the wiring
    from rlhf_ds.config import PPOConfig, SFTConfig

    assert plans["sft"].cfg.train == SFTConfig().train and plans["sft"].cfg.engine == SFTConfig().engine
    assert plans["ppo"].cfg.ppo == PPOConfig().ppo
    assert plans["eval"].cfg.generation.max_new_tokens == PPOConfig().generation.max_new_tokens
    assert plans["eval"].cfg.generation.do_sample is True and plans["eval"].cfg.samples_per_prompt == 4


def test_plan_given_models_skip_steps(tmp_path):
    base = _fake_model(tmp_path / "base")
    plans, run = _plan(tmp_path, f"base_model={base}")
    assert plans["pretrain"].action == "given" and plans["sft"].cfg.model == base
    sft = _fake_model(tmp_path / "sft")
    rm = _fake_model(tmp_path / "rm")
    plans, run = _plan(tmp_path, f"sft_model={sft}", f"reward_model={rm}")
    assert [plans[s].action for s in STEPS] == ["run", "given", "given", "run", "run"]
    assert plans["ppo"].inputs == {"actor": sft, "reward": rm}
    assert plans["eval"].inputs == {"sft": sft, "ppo": f"{run}/ppo", "reward": rm}
    # an explicit path in a step's own section wins over the wiring
    plans, _ = _plan(tmp_path, f"rm.model={base}")
    assert plans["rm"].cfg.model == base and plans["ppo"].cfg.actor.model == f"{run}/sft"


def test_plan_skip_only_resume(tmp_path):
    plans, run = _plan(tmp_path, "skip=[pretrain]")
    assert plans["pretrain"].action == "skip" and plans["sft"].action == "run"
    with pytest.raises(ConfigError, match="step 'sft' needs its model"):
        pipeline.check_inputs(list(plans.values()))  # nothing made <run>/pretrain
    _fake_model(os.path.join(run, "pretrain"))
    pipeline.check_inputs(list(plans.values()))

    plans, _ = _plan(tmp_path, "only=rm")
    assert [plans[s].action for s in STEPS] == ["skip", "skip", "run", "skip", "skip"]
    plans, _ = _plan(tmp_path, "only=sft,ppo")
    assert [plans[s].action for s in STEPS] == ["skip", "run", "skip", "run", "skip"]
    with pytest.raises(ConfigError, match="needs the reward model"):
        pipeline.check_inputs(list(plans.values()))

    os.makedirs(os.path.join(run, "sft"), exist_ok=True)
    with open(os.path.join(run, "sft", "results.json"), "w") as f:
        f.write("{}")
    plans, _ = _plan(tmp_path, "resume_completed_steps=true")
    assert [plans[s].action for s in STEPS] == ["run", "done", "run", "run", "run"]
    plans, _ = _plan(tmp_path)
    assert plans["sft"].action == "run"  # re-run by default


def test_plan_errors_and_tracking(tmp_path):
    with pytest.raises(ConfigError, match="unknown step 'rl'"):
        _plan(tmp_path, "skip=[rl]")
    with pytest.raises(ConfigError, match="only names 'sft' but sft_model is given"):
        _plan(tmp_path, "only=sft", f"sft_model={tmp_path}")
    with pytest.raises(ConfigError, match="did you mean 'sft.train.epochs'"):
        _plan(tmp_path, "sft.train.epoch=3")
    plans, _ = _plan(tmp_path, "sft.train.epochs=3", "tracking.wandb=true", "tracking.wandb_group=g",
                     "tracking.wandb_project=proj", "task.seed=5")
    assert plans["sft"].cfg.train.epochs == 3
    for s in STEPS:
        t = plans[s].cfg.tracking
        assert (t.wandb, t.wandb_group, t.wandb_project, t.wandb_run_name) == (True, "g", "proj", f"g-{s}")
        assert plans[s].cfg.task.seed == 5


def test_dry_run_cli(tmp_path, capsys):
    assert cli.main(["pipeline", "--dry-run", f"output_dir={tmp_path / 'r'}", "--num-gpus", "4", "skip=pretrain",
                     f"base_model={_fake_model(tmp_path / 'b')}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["action"], s["ranks"]) for s in shown["steps"]] == [
        ("pretrain", "given", 0), ("sft", "run", 4), ("rm", "run", 4), ("ppo", "run", 4), ("eval", "run", 1)]
    assert not os.path.exists(tmp_path / "r")  # a dry run writes nothing
    assert cli.main(["pipeline", "--dry-run", f"output_dir={tmp_path / 'r'}", "only=rm"]) == 2
