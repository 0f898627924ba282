"""The run report on a synthetic run directory (no training): summary.json from the steps' results, the concatenated
metrics.jsonl, plots only where there is data, a self-contained and escaped report.html, `rlhf-ds report`; and the
reader of wandb's offline transaction log.
"""
from __future__ import annotations

import base64
import json
import os
import re

import pytest

from rlhf_ds import cli
from rlhf_ds.tracking import report
from rlhf_ds.tracking.wandb_utils import offline_runs, read_offline_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(obj, list):
            f.write("".join(json.dumps(r) + "\n" for r in obj))
        else:
            json.dump(obj, f)


def _metrics(step_name: str, keys: dict[str, callable], steps: range) -> list[dict]:
    return [{"step_name": step_name, "step": s, "time": 0.0, **{k: f(s) for k, f in keys.items()}} for s in steps]


@pytest.fixture
def fake_run(tmp_path) -> str:
    run = str(tmp_path / "run")
    _write(f"{run}/pretrain/results.json", {"eval_loss": 4.0, "steps": 30})
    _write(f"{run}/pretrain/metrics.jsonl", _metrics("pretrain", {"pretrain/loss": lambda s: 6 - s / 10}, range(5, 31, 5)))
    _write(f"{run}/sft/results.json", {"eval_loss": 2.5, "eval_loss_start": 3.0, "steps": 20})
    _write(f"{run}/sft/metrics.jsonl", _metrics("sft", {"sft/loss": lambda s: 3 - s / 20}, range(1, 21))
           + [{"step_name": "sft", "step": 20, "time": 0.0, "sft/eval_loss": 2.5}])
    _write(f"{run}/rm/results.json", {"eval_accuracy": 0.7, "eval_accuracy_start": 0.5, "bayes_ceiling": 0.8})
    _write(f"{run}/rm/metrics.jsonl", _metrics("rm", {"rm/loss": lambda s: 0.7 - s / 100, "rm/accuracy": lambda s: 0.5 + s / 100},
                                               range(1, 21)))
    _write(f"{run}/ppo/results.json", {"reward_mean": 0.4, "kl": 1.5, "beta": 0.05, "seconds": 10.0,
                                       "generation_seconds": 3.0, "scoring_seconds": 2.0, "training_seconds": 4.0})
    _write(f"{run}/ppo/metrics.jsonl", _metrics("ppo", {"ppo/reward": lambda s: s / 10, "ppo/kl": lambda s: s / 5,
                                                        "ppo/beta": lambda s: 0.05, "ppo/gold_reward": lambda s: s / 4,
                                                        "ppo/response_length": lambda s: 20 - s}, range(1, 6)))
    _write(f"{run}/eval/results.json", {"n_prompts": 2, "gold_reward": {"sft": 0.5, "ppo": 1.0, "best": 3.0},
                                        "win_rate_ppo_vs_sft": 0.75, "rm_score": {"sft": 0.1, "ppo": 0.6}})
    _write(f"{run}/eval/metrics.jsonl", [{"step_name": "eval", "step": 0, "time": 0.0, "eval/gold_reward/sft": 0.5}])
    _write(f"{run}/eval/samples.jsonl", [
        {"prompt": "human : describe the <b>red</b> fox . assistant :", "sft_response": "the fox <script>x</script>",
         "ppo_response": "the fox is calm .", "sft_gold_reward": 0.0, "ppo_gold_reward": 1.5, "sft_rm_score": 0.1,
         "ppo_rm_score": 0.9},
        {"prompt": "human : what about the cat ? assistant :", "sft_response": "the cat is warm .",
         "ppo_response": "the cat .", "sft_gold_reward": 1.0, "ppo_gold_reward": 0.5, "sft_rm_score": 0.1,
         "ppo_rm_score": 0.3},
    ])
    _write(f"{run}/pipeline.json", {"steps": {s: {"status": "done", "seconds": float(i + 1)}
                                              for i, s in enumerate(("pretrain", "sft", "rm", "ppo", "eval"))}})
    return run


def test_summary_metrics_plots_and_html(fake_run):
    summary = report.write_report(fake_run)
    on_disk = json.load(open(os.path.join(fake_run, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary))
    for key, want in [("sft.eval_loss", 2.5), ("rm.eval_accuracy", 0.7), ("rm.bayes_ceiling", 0.8),
                      ("ppo.reward_mean", 0.4), ("ppo.kl", 1.5), ("eval.gold_reward.sft", 0.5),
                      ("eval.gold_reward.ppo", 1.0), ("eval.win_rate_ppo_vs_sft", 0.75),
                      ("timing.pretrain_seconds", 1.0), ("timing.eval_seconds", 5.0), ("timing.total_seconds", 15.0)]:
        assert report.get(on_disk, key) == want, key
    assert on_disk["steps"] == {s: "done" for s in ("pretrain", "sft", "rm", "ppo", "eval")}

    # metrics.jsonl: every step's lines, in pipeline order
    lines = [json.loads(x) for x in open(os.path.join(fake_run, "metrics.jsonl"))]
    assert len(lines) == 6 + 21 + 20 + 5 + 1
    order = [r["step_name"] for r in lines]
    assert order == sorted(order, key=["pretrain", "sft", "rm", "ppo", "eval"].index)

    plots = sorted(os.listdir(os.path.join(fake_run, "plots")))
    assert plots == sorted(f"{n}.png" for n in ("lm_loss", "rm_loss", "rm_accuracy", "ppo_reward", "ppo_kl", "ppo_beta",
                                                  "gold_reward", "response_length", "eval_gold", "time_split"))
    for name in plots:
        with open(os.path.join(fake_run, "plots", name), "rb") as f:
            data = f.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    page = open(os.path.join(fake_run, "report.html"), encoding="utf-8").read()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(plots)
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    # user text is escaped: the sample's markup shows as text, it does not become markup
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x</script>" not in page
    assert "&lt;b&gt;red&lt;/b&gt;" in page
    assert "the fox is calm ." in page and "the cat is warm ." in page
    assert "Win rate PPO vs SFT" in page and "75.0%" in page


def test_missing_steps_are_left_out(tmp_path):
    run = str(tmp_path / "half")
    _write(f"{run}/sft/results.json", {"eval_loss": 2.0})
    _write(f"{run}/sft/metrics.jsonl", _metrics("sft", {"sft/loss": lambda s: 1.0}, range(1, 4)))
    _write(f"{run}/sft/model/config.json", {})
    # a stale plot of an earlier run must not survive a regeneration without its data
    _write(f"{run}/plots/ppo_kl.png", {})
    summary = report.write_report(run)
    assert summary["steps"] == {"pretrain": "missing", "sft": "done", "rm": "missing", "ppo": "missing", "eval": "missing"}
    assert summary["timing"] == {}
    assert os.listdir(os.path.join(run, "plots")) == ["lm_loss.png"]
    page = open(os.path.join(run, "report.html"), encoding="utf-8").read()
    assert "No data for:" in page and "No evaluation samples" in page


def test_results_of_given_models_are_found(tmp_path):
    """A step replaced by a given model (sft_model=elsewhere/sft/model) still shows that model's figures."""
    elsewhere = str(tmp_path / "elsewhere" / "sft")
    _write(f"{elsewhere}/results.json", {"eval_loss": 1.25})
    run = str(tmp_path / "run")
    _write(f"{run}/pipeline.json", {"steps": {"sft": {"status": "given", "reason": f"sft_model={elsewhere}/model"}}})
    summary = report.write_report(run)
    assert summary["sft"] == {"eval_loss": 1.25}
    assert summary["steps"]["sft"] == "given"


def test_report_cli(fake_run, tmp_path, capsys):
    assert cli.main(["report", fake_run]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert os.path.isfile(os.path.join(fake_run, "report.html"))
    assert cli.main(["report", str(tmp_path / "nope")]) == 2


def test_wandb_offline_reader(tmp_path, monkeypatch):
    """A run logged with WANDB_MODE=offline reads back: run identity, config, every history row, summary."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="rlhf_ds_test", name="g-sft", group="g", job_type="sft", dir=str(tmp_path),
                     config={"lr": 1e-4, "nested": {"a": 1}}, tags=["t1"])
    # enough data to span several 32 KiB blocks of the log (records cut across blocks)
    for step in range(1, 301):
        run.log({"sft/loss": 1.0 / step, "sft/text_len": step * 3.5, "pad": "x" * 200}, step=step)
    run.summary.update({"eval_loss": 0.25})
    run.finish()
    wandb.teardown()  # the service writes the log asynchronously; a finished *process* has flushed it all
    files = offline_runs(str(tmp_path))
    assert len(files) == 1 and os.path.getsize(files[0]) > 3 * 32768
    data = read_offline_run(files[0])
    assert data["run"]["group"] == "g" and data["run"]["name"] == "g-sft" and data["run"]["job_type"] == "sft"
    assert data["run"]["tags"] == ["t1"]
    assert data["config"]["lr"] == 1e-4 and data["config"]["nested"] == {"a": 1}
    rows = {r["_step"]: r for r in data["history"]}
    assert sorted(rows) == list(range(1, 301))
    assert all(rows[s]["sft/loss"] == pytest.approx(1.0 / s) for s in rows)
    assert data["summary"]["eval_loss"] == 0.25
    assert data["summary"]["sft/loss"] == pytest.approx(1 / 300)
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(b"not a wandb log")
    with pytest.raises(ValueError):
        read_offline_run(str(bad))


def test_collapse_banner_diversity_plot_and_reward_model_section(fake_run):
    from rlhf_ds.tracking.rm_report import margin_table, top_responses

    page = report.render_html(fake_run, report.collect_summary(fake_run), [], [])
    assert "PPO rollouts collapsed" not in page and "Not computed: run <code>rlhf-ds rm-report" in page

    with open(os.path.join(fake_run, "ppo", "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    _write(f"{fake_run}/ppo/results.json", {**results, "distinct_fraction": 0.1, "reward_length_corr": 0.6,
                                            "collapse_distinct_below": 0.3, "collapse_distinct2_below": 0.3,
                                            "collapse_warning_steps": [5]})
    _write(f"{fake_run}/ppo/metrics.jsonl", _metrics("ppo", {"ppo/reward": lambda s: s / 10,
                                                            "ppo/distinct_fraction": lambda s: 1 / s,
                                                            "ppo/distinct_2": lambda s: 0.5 / s,
                                                            "ppo/reward_length_corr": lambda s: s / 10}, range(1, 9)))
    _write(f"{fake_run}/rm_report.json", {"reward_model": "rm", "samples": {"policies": {"ppo": {
        "n": 3, "distinct": 2, "top": top_responses(["it is nice .", "it is nice .", "a fox"], [2.0, 2.0, 1.0])}}},
        "pairs": {"source": "pairs.jsonl", "n": 2, "accuracy": 0.5, "by_margin": margin_table([1.0, 0.0], [0.0, 0.1]),
                  "by_length_difference": [], "longer_preferred": {"n": 0, "labels": None, "reward_model": None}}})
    report.write_report(fake_run)
    assert os.path.getsize(os.path.join(fake_run, "plots", "ppo_diversity.png")) > 5000
    page = open(os.path.join(fake_run, "report.html"), encoding="utf-8").read()
    assert "PPO rollouts collapsed: the fraction of distinct responses or of distinct bigrams" in page
    assert "(warned at steps 5)" in page
    assert "Distinct responses (last 10%)" in page and "10%" in page
    assert "Highest-scoring responses of the PPO policy (2 distinct of 3 samples)" in page
    assert "it is nice ." in page and "Accuracy by the RM's margin" in page
