"""`rlhf-ds rm-report`: what a reward model rewards.

* accuracy on held-out preference pairs (any preference format, read with the rm step's format / columns / template
  options; the template defaults to the RM's own) by the RM's own margin |r_chosen - r_rejected| (is a confident RM
  right more often?) and by the length difference of the two answers (does it just prefer the longer, or the shorter,
  one?);
* the highest-scoring responses among a policy's samples (distinct texts, with how often each was sampled): when PPO
  collapses onto one over-rewarded answer, it is at the top of this list with a large count.

The bucketing and ranking are pure functions; `write_rm_report` scores with plain transformers in one process and
writes `rm_report.json` and `rm_report.html`. `rlhf-ds report` adds the same tables to a pipeline run's report.html
when `rm_report.json` lies in the run folder.
"""
from __future__ import annotations

import html
import json
import math
import os
import sys
from typing import Optional, Sequence

from rlhf_ds.utils import atomic_write_json, atomic_write_text

INF = math.inf
# (label, lower bound inclusive, upper bound exclusive)
MARGIN_BUCKETS = [("< 0.25", 0.0, 0.25), ("0.25-0.5", 0.25, 0.5), ("0.5-1", 0.5, 1.0), ("1-2", 1.0, 2.0),
                  (">= 2", 2.0, INF)]
LENGTH_BUCKETS = [("chosen shorter by 5+ words", -INF, -4.5), ("chosen shorter by 1-4", -4.5, -0.5),
                  ("same length", -0.5, 0.5), ("chosen longer by 1-4", 0.5, 4.5), ("chosen longer by 5+", 4.5, INF)]


def bucket_accuracy(chosen: Sequence[float], rejected: Sequence[float], keys: Sequence[float],
                    buckets: list[tuple[str, float, float]]) -> list[dict]:
    """Pairwise accuracy (chosen scored above rejected) of the pairs whose key falls in each bucket; empty buckets are
    listed with n = 0 and accuracy None."""
    out = []
    for label, lo, hi in buckets:
        hits = [c > r for c, r, k in zip(chosen, rejected, keys) if lo <= k < hi]
        out.append({"bucket": label, "n": len(hits), "accuracy": sum(hits) / len(hits) if hits else None})
    return out


def margin_table(chosen: Sequence[float], rejected: Sequence[float]) -> list[dict]:
    return bucket_accuracy(chosen, rejected, [abs(c - r) for c, r in zip(chosen, rejected)], MARGIN_BUCKETS)


def length_table(chosen: Sequence[float], rejected: Sequence[float], chosen_words: Sequence[int],
                 rejected_words: Sequence[int]) -> list[dict]:
    return bucket_accuracy(chosen, rejected, [a - b for a, b in zip(chosen_words, rejected_words)], LENGTH_BUCKETS)


def longer_preferred(chosen: Sequence[float], rejected: Sequence[float], chosen_words: Sequence[int],
                     rejected_words: Sequence[int]) -> dict:
    """Among pairs of unequal length: how often the labels prefer the longer answer, and how often the RM does."""
    pairs = [(c > r, a > b) for c, r, a, b in zip(chosen, rejected, chosen_words, rejected_words) if a != b]
    if not pairs:
        return {"n": 0, "labels": None, "reward_model": None}
    rm_longer = sum(rm_chose_chosen == chosen_longer for rm_chose_chosen, chosen_longer in pairs)
    return {"n": len(pairs), "labels": sum(longer for _, longer in pairs) / len(pairs),
            "reward_model": rm_longer / len(pairs)}


def top_responses(responses: Sequence[str], scores: Sequence[float], gold: Optional[Sequence[float]] = None,
                  n: int = 10) -> list[dict]:
    """Distinct responses by mean RM score, highest first: text, how many samples were this text, mean score (and
    mean gold reward when given)."""
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(responses):
        groups.setdefault(text, []).append(i)
    rows = []
    for text, idx in groups.items():
        row = {"response": text, "count": len(idx), "rm_score": sum(scores[i] for i in idx) / len(idx)}
        if gold is not None:
            row["gold_reward"] = sum(gold[i] for i in idx) / len(idx)
        rows.append(row)
    rows.sort(key=lambda r: (-r["rm_score"], -r["count"], r["response"]))
    return rows[:n]


# ---- scoring and writing ---------------------------------------------------------------------------------------------
def _policy_samples(path: str) -> dict[str, dict[str, list]]:
    """eval/samples.jsonl (`<policy>_response`, optional `<policy>_gold_reward`) or generate's output (`response`):
    {policy: {"prompts", "responses", "gold"}}."""
    from rlhf_ds.data.readers import DataError, read_records

    records = read_records(path)
    if not records:
        raise DataError("no rows found", file=path)
    names = sorted({k[: -len("_response")] for k in records[0].data if k.endswith("_response")}) or [""]
    out = {}
    for name in names:
        key = f"{name}_response" if name else "response"
        rows = [r for r in records if isinstance(r.data.get(key), str) and isinstance(r.data.get("prompt"), str)]
        if not rows:
            raise DataError(f"no rows with text fields 'prompt' and {key!r}", file=path)
        gold_key = f"{name}_gold_reward" if name else "gold_reward"
        gold = [r.data.get(gold_key) for r in rows]
        out[name or "policy"] = {"prompts": [r.data["prompt"] for r in rows], "responses": [r.data[key] for r in rows],
                                 "gold": gold if all(isinstance(g, (int, float)) for g in gold) else None}
    return out


NO_TEMPLATE = "none"  # --template none: the pairs' prompts as they are, whatever the reward model was trained with


def trained_templates(reward_model: str) -> Optional[list]:
    """The prompt templates the reward model was trained with (`prompt_templates` of its scalar_head.json; None =
    prompts as they were), or None when it does not say (an older or a plain model folder)."""
    from rlhf_ds.models.loading import resolve_model_dir
    from rlhf_ds.models.scalar_head import HEAD_META

    path = os.path.join(resolve_model_dir(reward_model), HEAD_META)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("prompt_templates")
    except (ValueError, AttributeError):
        return None
    return saved if isinstance(saved, list) else None


def pairs_template(reward_model: str, template: Optional[str] = None) -> tuple[Optional[str], str]:
    """(the template to render the pairs' prompts with, where it came from): `template` when given (`none`: the
    prompts as they are), else the reward model's own when it was trained with exactly one (the same rendering as its
    training pairs: a user's raw preference file reads as in `rlhf-ds rm`), else none."""
    if template is not None:
        return (None, "--template none") if template == NO_TEMPLATE else (template, "--template")
    trained = trained_templates(reward_model)
    if trained is not None and len(trained) == 1:
        return trained[0], "the reward model's training template, from its scalar_head.json"
    if trained:
        return None, (f"the reward model was trained with several templates {trained}: pass --template to render the "
                      "pairs like one of them")
    return None, "the reward model names no template"


def build_rm_report(scorer, pairs: Optional[str] = None, samples: Optional[str] = None, batch_size: int = 32,
                    top: int = 10, fmt: str = "auto", columns: Optional[dict] = None, template: Optional[str] = None,
                    on_bad_row: str = "error") -> dict:
    """Score preference pairs and/or a policy's samples with `scorer` (a RewardScorer) and tabulate them. `pairs` is
    any preference file or folder, read as `rlhf-ds rm` reads its data: `fmt` (data.format), `columns`
    (data.columns), `template` (data.template: a plain prompt rendered with it, None = as it is) and `on_bad_row`."""
    from rlhf_ds.data.formats import load_preferences

    report: dict = {}
    if pairs:
        examples, parsed = load_preferences(pairs, fmt=fmt, columns=columns, template=template, on_bad_row=on_bad_row)
        if not examples:
            from rlhf_ds.data.readers import DataError

            raise DataError(f"no preference pairs left ({parsed.summary()})", file=str(pairs))
        prompts = [ex.prompt for ex in examples]
        chosen = scorer.score(prompts, [ex.chosen for ex in examples], batch_size=batch_size)
        rejected = scorer.score(prompts, [ex.rejected for ex in examples], batch_size=batch_size)
        cw = [len(ex.chosen.split()) for ex in examples]
        rw = [len(ex.rejected.split()) for ex in examples]
        report["pairs"] = {"source": pairs, "n": len(examples), "format": parsed.fmt, "template": template,
                           "rows": parsed.total, "rows_skipped": sum(parsed.skipped.values()),
                           "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(examples),
                           "by_margin": margin_table(chosen, rejected),
                           "by_length_difference": length_table(chosen, rejected, cw, rw),
                           "longer_preferred": longer_preferred(chosen, rejected, cw, rw)}
    if samples:
        report["samples"] = {"source": samples, "policies": {}}
        for name, s in _policy_samples(samples).items():
            scores = scorer.score(s["prompts"], s["responses"], batch_size=batch_size)
            report["samples"]["policies"][name] = {
                "n": len(scores), "distinct": len(set(s["responses"])),
                "top": top_responses(s["responses"], scores, s["gold"], top)}
    return report


def write_rm_report(reward_model: str, output_dir: str, pairs: Optional[str] = None, samples: Optional[str] = None,
                    batch_size: int = 32, device: str = "auto", precision: str = "fp32", fmt: str = "auto",
                    columns: Optional[dict] = None, template: Optional[str] = None, on_bad_row: str = "error") -> dict:
    """`rlhf-ds rm-report`: rm_report.json and rm_report.html in `output_dir` (written only once everything is scored).
    The pairs' options are build_rm_report's; `template` None = the reward model's own (`pairs_template`)."""
    from rlhf_ds.data.formats import check_template
    from rlhf_ds.models.loading import pick_device
    from rlhf_ds.models.scalar_head import reward_scorer

    if not pairs and not samples:
        raise ValueError("rm-report needs --pairs (held-out preference pairs) and/or --samples (a policy's responses)")
    if pairs:
        template, why = pairs_template(reward_model, template)
        if template is not None:
            check_template(template, "--template")
        print(f"rm-report: pairs {pairs}: prompt template {template!r} ({why})", file=sys.stderr)
    scorer = reward_scorer(reward_model, pick_device(device), precision)
    report = {"reward_model": reward_model, **build_rm_report(scorer, pairs, samples, batch_size, fmt=fmt,
                                                              columns=columns, template=template,
                                                              on_bad_row=on_bad_row)}
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, "rm_report.json"), report)
    atomic_write_text(os.path.join(output_dir, "rm_report.html"),
                      "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Reward model report</title>"
                      f"</head><body><h1>Reward model report</h1>{rm_report_html(report)}</body></html>")
    return report


def _num(v, fmt: str = "{:.3f}") -> str:
    return "" if v is None else html.escape(fmt.format(v))


def _bucket_rows(rows: list[dict]) -> str:
    return "".join(f"<tr><td>{html.escape(r['bucket'])}</td><td class='num'>{r['n']}</td>"
                   f"<td class='num'>{_num(r['accuracy'])}</td></tr>" for r in rows)


def rm_report_html(report: dict) -> str:
    """The tables of an rm_report.json, as an HTML fragment (also used inside a pipeline run's report.html)."""
    parts = [f"<p class='muted'>Reward model: {html.escape(str(report.get('reward_model', '')))}</p>"]
    pairs = report.get("pairs")
    if pairs:
        head = "<tr><th>bucket</th><th>pairs</th><th>accuracy</th></tr>"
        longer = pairs["longer_preferred"]
        parts.append(
            f"<p>{pairs['n']} held-out pairs ({html.escape(str(pairs['source']))}"
            + (f", prompts rendered with the template {html.escape(repr(pairs['template']))}"
               if pairs.get("template") else "")
            + f"): accuracy {_num(pairs['accuracy'])}. "
            f"Among pairs of unequal length the labels prefer the longer answer in {_num(longer['labels'], '{:.0%}')} "
            f"of them, the reward model in {_num(longer['reward_model'], '{:.0%}')}.</p>"
            f"<h3>Accuracy by the RM's margin |r_chosen - r_rejected|</h3><table>{head}{_bucket_rows(pairs['by_margin'])}"
            f"</table><h3>Accuracy by length difference (words)</h3><table>{head}"
            f"{_bucket_rows(pairs['by_length_difference'])}</table>")
    for name, policy in (report.get("samples") or {}).get("policies", {}).items():
        gold = any("gold_reward" in r for r in policy["top"])
        head = ("<tr><th>#</th><th>response</th><th>times sampled</th><th>RM score</th>"
                + ("<th>gold reward</th>" if gold else "") + "</tr>")
        rows = "".join(
            f"<tr><td class='num'>{i + 1}</td><td class='resp'>{html.escape(r['response'])}</td>"
            f"<td class='num'>{r['count']}</td><td class='num'>{_num(r['rm_score'], '{:+.3f}')}</td>"
            + (f"<td class='num'>{_num(r.get('gold_reward'), '{:+.3f}')}</td>" if gold else "") + "</tr>"
            for i, r in enumerate(policy["top"]))
        parts.append(f"<h3>Highest-scoring responses of the {html.escape(name.upper())} policy "
                     f"({policy['distinct']} distinct of {policy['n']} samples)</h3><table>{head}{rows}</table>")
    return "".join(parts)


def read_rm_report(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "rm_report.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
