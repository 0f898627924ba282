"""`rlhf-ds rm-report`: the bucket tables and the top-responses list against hand-computed numbers, then one real run
of the command on a tiny reward model."""
import json
import os

import pytest
from conftest import run_cli
from dist_hybrid_models import tiny_models

from rlhf_ds.tracking.rm_report import (
    bucket_accuracy,
    length_table,
    longer_preferred,
    margin_table,
    top_responses,
)


def test_accuracy_by_margin_bucket():
    chosen = [1.0, 0.1, 2.0, 0.0, 3.0]
    rejected = [0.9, 0.2, 1.0, 2.5, 0.0]  # margins 0.1 (right), 0.1 (wrong), 1.0 (right), 2.5 (wrong), 3.0 (right)
    table = {row["bucket"]: (row["n"], row["accuracy"]) for row in margin_table(chosen, rejected)}
    assert table == {"< 0.25": (2, 0.5), "0.25-0.5": (0, None), "0.5-1": (0, None), "1-2": (1, 1.0), ">= 2": (2, 0.5)}


def test_accuracy_by_length_difference_and_length_preference():
    chosen, rejected = [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    cw, rw = [10, 3, 3, 4], [2, 5, 3, 4]  # differences +8, -2, 0, 0
    table = {row["bucket"]: (row["n"], row["accuracy"]) for row in length_table(chosen, rejected, cw, rw)}
    assert table["chosen longer by 5+"] == (1, 1.0) and table["chosen shorter by 1-4"] == (1, 1.0)
    assert table["same length"] == (2, 0.5) and table["chosen shorter by 5+ words"] == (0, None)
    # unequal pairs: (+8, RM right -> picks longer), (-2, RM right -> picks shorter); labels prefer longer in 1 of 2
    assert longer_preferred(chosen, rejected, cw, rw) == {"n": 2, "labels": 0.5, "reward_model": 0.5}
    assert longer_preferred([1.0], [0.0], [3], [3]) == {"n": 0, "labels": None, "reward_model": None}


def test_bucket_bounds_are_lower_inclusive():
    rows = bucket_accuracy([1, 0], [0, 1], [0.5, 1.0], [("a", 0.0, 0.5), ("b", 0.5, 1.0), ("c", 1.0, 2.0)])
    assert [(r["n"], r["accuracy"]) for r in rows] == [(0, None), (1, 1.0), (1, 0.0)]


def test_top_responses_groups_identical_texts():
    responses = ["it is nice .", "it is nice .", "the fox runs .", "it is nice .", "meh"]
    scores = [2.0, 2.2, 1.0, 2.4, -1.0]
    gold = [0.1, 0.1, 1.5, 0.1, -2.0]
    top = top_responses(responses, scores, gold, n=2)
    assert top == [{"response": "it is nice .", "count": 3, "rm_score": pytest.approx(2.2), "gold_reward": pytest.approx(0.1)},
                   {"response": "the fox runs .", "count": 1, "rm_score": 1.0, "gold_reward": 1.5}]
    assert "gold_reward" not in top_responses(responses, scores)[0]


def test_rm_report_command(tmp_path_factory, tmp_path):
    models = tiny_models(tmp_path_factory)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"human : describe the {s} . assistant :",
                                         "chosen": f" the {s} is calm .", "rejected": f" {s} {s} {s} {s} {s} {s}"}) + "\n"
                             for s in ("fox", "cat", "lake", "drum")), encoding="utf-8")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": "human : describe the fox . assistant :", "ppo_response": r,
                                           "ppo_gold_reward": g}) + "\n"
                               for r, g in (("the fox is calm .", 1.0), ("it is .", 0.2), ("the fox is calm .", 1.0))),
                       encoding="utf-8")
    out = str(tmp_path / "report")
    run_cli(["rm-report", models["gpt2_rm"], "--pairs", str(pairs), "--samples", str(samples), "-o", out])
    with open(os.path.join(out, "rm_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["pairs"]["n"] == 4 and sum(r["n"] for r in report["pairs"]["by_margin"]) == 4
    assert report["pairs"]["by_length_difference"][1]["n"] == 4  # chosen shorter by 1-4 words in every pair
    ppo = report["samples"]["policies"]["ppo"]
    assert ppo["n"] == 3 and ppo["distinct"] == 2 and {r["count"] for r in ppo["top"]} == {1, 2}
    assert "Highest-scoring responses of the PPO policy" in open(os.path.join(out, "rm_report.html"), encoding="utf-8").read()


def test_rm_report_reads_a_users_preference_file_as_the_rm_step_does(tmp_path_factory, tmp_path, capsys):
    """A user's stack-exchange file with its own column names: --columns renames them, and the prompts are rendered
    with the template the reward model was trained with (its scalar_head.json; --template overrides, `none` turns it
    off). The report's numbers are those of scoring the rendered texts directly."""
    import shutil

    from rlhf_ds import cli
    from rlhf_ds.models.scalar_head import RewardScorer

    template = "Question: {question}\n\nAnswer: {response}"
    rm = str(tmp_path / "rm")
    shutil.copytree(tiny_models(tmp_path_factory)["gpt2_rm"], rm)
    meta_path = os.path.join(rm, "scalar_head.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump({**meta, "prompt_templates": [template]}, f)
    subjects = ("fox", "cat", "lake", "drum")
    rows = [{"title": f"describe the {s} .", "good": f"the {s} is calm .", "bad": f"{s} {s} {s} {s} {s} {s}",
             "id": i} for i, s in enumerate(subjects)]
    pairs = tmp_path / "se.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    columns = "{question: title, response_j: good, response_k: bad}"

    out = str(tmp_path / "report")
    assert cli.main(["rm-report", rm, "--pairs", str(pairs), "--columns", columns, "-o", out]) == 0
    assert f"rm-report: pairs {pairs}: prompt template {template!r} (the reward model's training template" in \
        capsys.readouterr().err
    with open(os.path.join(out, "rm_report.json"), encoding="utf-8") as f:
        got = json.load(f)["pairs"]
    prompts = [f"Question: describe the {s} .\n\nAnswer:" for s in subjects]
    scorer = RewardScorer(rm)
    chosen = scorer.score(prompts, [f" the {s} is calm ." for s in subjects])
    rejected = scorer.score(prompts, [" " + " ".join([s] * 6) for s in subjects])
    assert (got["n"], got["rows"], got["rows_skipped"], got["format"], got["template"]) == \
        (4, 4, 0, "stack_exchange", template)
    assert got["accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / 4
    assert got["by_margin"] == margin_table(chosen, rejected)
    assert got["by_length_difference"] == length_table(chosen, rejected, [5] * 4, [6] * 4)
    assert got["by_length_difference"][1] == {"bucket": "chosen shorter by 1-4", "n": 4, "accuracy": got["accuracy"]}
    html_text = open(os.path.join(out, "rm_report.html"), encoding="utf-8").read()
    assert "prompts rendered with the template" in html_text

    # --template none: the bare question as the prompt, the answers as they are -> other scores
    out2 = str(tmp_path / "report2")
    assert cli.main(["rm-report", rm, "--pairs", str(pairs), "--columns", columns, "--template", "none",
                     "-o", out2]) == 0
    with open(os.path.join(out2, "rm_report.json"), encoding="utf-8") as f:
        bare = json.load(f)["pairs"]
    raw = [r["title"] for r in rows]
    direct = scorer.score(raw, [r["good"] for r in rows]), scorer.score(raw, [r["bad"] for r in rows])
    assert bare["template"] is None and bare["by_margin"] == margin_table(*direct)
    # ranked answers (--format ranked): every pair of a row, as the rm step expands them
    ranked = tmp_path / "ranked.csv"
    ranked.write_text("q,answers\n" + "".join(f'"describe the {s} .","[""the {s} is calm ."", ""a {s} ."", '
                                               f'""{s} {s} {s}""]"\n' for s in subjects), encoding="utf-8")
    out3 = str(tmp_path / "report3")
    assert cli.main(["rm-report", rm, "--pairs", str(ranked), "--format", "ranked", "--columns",
                     '{"prompt": "q", "responses": "answers"}', "--template", "Q: {prompt}\\nA: {response}",
                     "-o", out3]) == 0
    with open(os.path.join(out3, "rm_report.json"), encoding="utf-8") as f:
        r3 = json.load(f)["pairs"]
    assert (r3["n"], r3["rows"], r3["format"], r3["template"]) == (12, 4, "ranked", "Q: {prompt}\nA: {response}")
    # bad options: exit 2 before anything is written
    for bad in (["--columns", "[1, 2]"], ["--template", "Q: {query}"], ["--format", "nope"]):
        out4 = str(tmp_path / "bad")
        assert cli.main(["rm-report", rm, "--pairs", str(pairs), *bad, "-o", out4]) == 2
        assert not os.path.exists(out4)
    err = capsys.readouterr().err
    assert "--columns: expected a mapping of column names" in err and "unknown: 'query'" in err
    assert "unknown preference format 'nope'" in err
