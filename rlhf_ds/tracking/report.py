"""The end of a pipeline run: `summary.json`, a top-level `metrics.jsonl`, PNG plots and a self-contained `report.html`.

Everything is rebuilt from the files the steps left in the run directory (`<step>/results.json`, `<step>/metrics.jsonl`,
`eval/samples.jsonl`, `pipeline.json`), so `rlhf-ds report <run_dir>` can regenerate it at any time, also for a run
that stopped half way (what is missing is left out and said so).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Optional

from rlhf_ds.config import ALGORITHM_STEPS, PIPELINE_STEPS
from rlhf_ds.tracking.rm_report import read_rm_report, rm_report_html
from rlhf_ds.utils import atomic_write_json, atomic_write_text

TRAINING_STEPS = ("pretrain", "sft", "rm", "ppo")
COLORS = {"pretrain": "#7f7f7f", "sft": "#1f77b4", "rm": "#9467bd", "ppo": "#d62728", "dpo": "#ff7f0e", "eval": "#2ca02c",
          "best": "#555555"}
POLICIES = ("sft", "ppo", "dpo")  # the policies the final evaluation compares
POLICY_COLORS = {"sft": COLORS["sft"], "ppo": "#8c564b", "dpo": COLORS["dpo"]}


# ---- reading the run directory -----------------------------------------------------------------------------------------
def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash
    return rows


def _given_results(path: str) -> Optional[dict]:
    """results.json next to a model given from elsewhere (a step run folder, or its `model/` inside)."""
    for candidate in (path, os.path.dirname(os.path.abspath(path)) if os.path.basename(path.rstrip("/")) == "model" else None):
        if candidate:
            res = _read_json(os.path.join(candidate, "results.json"))
            if res is not None:
                return res
    return None


def run_steps(run_dir: str, state: Optional[dict] = None) -> list[str]:
    """The steps of this run, in order: those of its `algorithm` (pipeline.json; PPO when unknown), plus any other step
    whose results are in the run directory."""
    state = state if state is not None else _read_json(os.path.join(run_dir, "pipeline.json")) or {}
    planned = ALGORITHM_STEPS[state.get("algorithm", "ppo")]
    return [s for s in PIPELINE_STEPS if s in planned or os.path.isfile(os.path.join(run_dir, s, "results.json"))]


def collect_summary(run_dir: str) -> dict:
    """{"<step>": that step's results.json, ..., "timing": {"<step>_seconds": ...}, "steps": {"<step>": status}}."""
    state = _read_json(os.path.join(run_dir, "pipeline.json")) or {"steps": {}}
    steps = state.get("steps", {})
    names = run_steps(run_dir, state)
    summary: dict = {"run_dir": os.path.abspath(run_dir)}
    for name in names:
        res = _read_json(os.path.join(run_dir, name, "results.json"))
        info = steps.get(name, {})
        if res is None and info.get("status") == "given":
            res = _given_results(info.get("reason", "").split("=", 1)[-1])
        if res is not None:
            summary[name] = res
    timing = {f"{name}_seconds": float(steps[name]["seconds"]) for name in names
              if isinstance(steps.get(name, {}).get("seconds"), (int, float))}
    if timing:
        timing["total_seconds"] = sum(timing.values())
    summary["timing"] = timing
    summary["steps"] = {name: steps.get(name, {}).get("status", "done" if name in summary else "missing")
                        for name in names}
    return summary


def concat_metrics(run_dir: str) -> list[dict]:
    """Every step's metrics.jsonl lines, in pipeline order (each line names its step in `step_name`)."""
    rows = []
    for name in run_steps(run_dir):
        rows += _read_jsonl(os.path.join(run_dir, name, "metrics.jsonl"))
    return rows


def get(tree: dict, dotted: str, default=None):
    """`get(summary, "eval.gold_reward.sft")`."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# ---- plots -------------------------------------------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict], step_name: str, key: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["step"], r[key]) for r in rows if r.get("step_name") == step_name and _finite(r.get(key)))
    return [p[0] for p in pts], [p[1] for p in pts]


def _new_axes(ncols: int = 1, width: float = 5.6, height: float = 3.4):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state or display needed

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and iterations
    return fig, list(axes)


def _line(ax, xs, ys, label, color, marker_if_short=True, **kw) -> bool:
    if not xs:
        return False
    ax.plot(xs, ys, label=label, color=color, marker="o" if marker_if_short and len(xs) <= 12 else None,
            markersize=3, **kw)
    return True


def _hline(ax, y, label, color, style="--") -> None:
    if _finite(y):
        ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=f"{label} ({y:.3g})")


def _finish(fig, axes, path: str) -> str:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _plot_lm_loss(rows, summary, path) -> Optional[str]:
    panels = [s for s in ("pretrain", "sft") if series(rows, s, f"{s}/loss")[0]]
    if not panels:
        return None
    fig, axes = _new_axes(len(panels))
    for ax, s in zip(axes, panels):
        _line(ax, *series(rows, s, f"{s}/loss"), "train loss", COLORS[s])
        _line(ax, *series(rows, s, f"{s}/eval_loss"), "eval loss", "black", linestyle="--")
        ax.set_title({"pretrain": "Step 0: pretraining loss", "sft": "Step 1: SFT loss"}[s])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("token NLL")
    return _finish(fig, axes, path)


def _plot_rm_loss(rows, summary, path) -> Optional[str]:
    xs, ys = series(rows, "rm", "rm/loss")
    if not xs:
        return None
    fig, (ax,) = _new_axes()
    _line(ax, xs, ys, "train loss", COLORS["rm"])
    _line(ax, *series(rows, "rm", "rm/eval_loss"), "eval loss", "black", linestyle="--")
    ax.set_title("Step 2: reward model loss (Bradley-Terry)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("-log sigmoid(r_chosen - r_rejected)")
    return _finish(fig, [ax], path)


def _plot_rm_accuracy(rows, summary, path) -> Optional[str]:
    xs, ys = series(rows, "rm", "rm/accuracy")
    ex, ey = series(rows, "rm", "rm/eval_accuracy")
    start = get(summary, "rm.eval_accuracy_start")
    if _finite(start) and (not ex or ex[0] > 0):  # the step logs the accuracy before training only in results.json
        ex, ey = [0, *ex], [start, *ey]
    if not xs and not ex:
        return None
    fig, (ax,) = _new_axes()
    _line(ax, xs, ys, "train batch accuracy", COLORS["rm"], alpha=0.6)
    _line(ax, ex, ey, "eval accuracy", "black", linestyle="--")
    _hline(ax, get(summary, "rm.bayes_ceiling"), "Bayes ceiling", "#2ca02c")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_title("Step 2: reward model pairwise accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0.3, 1.02)
    return _finish(fig, [ax], path)


def _ppo_plot(key: str, title: str, ylabel: str, extra=None):
    def plot(rows, summary, path) -> Optional[str]:
        xs, ys = series(rows, "ppo", f"ppo/{key}")
        if not xs:
            return None
        fig, (ax,) = _new_axes()
        _line(ax, xs, ys, "rollout mean", COLORS["ppo"])
        if extra:
            extra(ax, rows, summary)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(ylabel)
        return _finish(fig, [ax], path)

    return plot


def _reward_extra(ax, rows, summary):
    _line(ax, *series(rows, "ppo", "ppo/score_with_penalty"), "with penalties (shaped)", "#ff9896", alpha=0.8)
    for name in ("sft", "ppo"):
        _hline(ax, get(summary, f"eval.rm_score.{name}"), f"eval, {name.upper()} policy", COLORS[name] if name == "sft" else "#8c564b", ":")


def _gold_extra(ax, rows, summary):
    _hline(ax, get(summary, "eval.gold_reward.sft"), "eval, SFT policy", COLORS["sft"], ":")
    _hline(ax, get(summary, "eval.gold_reward.ppo"), "eval, PPO policy", "#8c564b", ":")
    _hline(ax, get(summary, "eval.gold_reward.best"), "best response", COLORS["best"], "-.")


def _length_extra(ax, rows, summary):
    _hline(ax, get(summary, "eval.response_length.sft"), "eval, SFT policy", COLORS["sft"], ":")
    _hline(ax, get(summary, "eval.response_length.ppo"), "eval, PPO policy", "#8c564b", ":")


def _plot_diversity(rows, summary, path) -> Optional[str]:
    """Distinct responses and distinct bigrams per rollout (left), correlation of RM score with length (right)."""
    xs, ys = series(rows, "ppo", "ppo/distinct_fraction")
    if not xs:
        return None
    fig, (left, right) = _new_axes(2)
    _line(left, xs, ys, "distinct responses", COLORS["ppo"])
    _line(left, *series(rows, "ppo", "ppo/distinct_2"), "distinct bigrams", "#ff9896")
    _hline(left, get(summary, "ppo.collapse_distinct_below"), "warning below (responses)", COLORS["ppo"], ":")
    _hline(left, get(summary, "ppo.collapse_distinct2_below"), "warning below (bigrams)", "#ff9896", ":")
    for step in get(summary, "ppo.collapse_warning_steps", []):
        left.axvline(step, color="#b00020", linewidth=1, alpha=0.6)
    left.set_title("Step 3: rollout diversity (red lines: collapse warnings)")
    left.set_xlabel("PPO iteration")
    left.set_ylabel("fraction distinct")
    left.set_ylim(0, 1.05)
    _line(right, *series(rows, "ppo", "ppo/reward_length_corr"), "corr(RM score, length)", "#8c564b")
    right.axhline(0, color="grey", linestyle=":", linewidth=1)
    right.set_title("Step 3: correlation of RM score with response length")
    right.set_xlabel("PPO iteration")
    right.set_ylim(-1.05, 1.05)
    return _finish(fig, [left, right], path)


def _plot_gold(rows, summary, path) -> Optional[str]:
    if series(rows, "ppo", "ppo/gold_reward")[0]:
        return _ppo_plot("gold_reward", "Gold reward (hidden, built-in task)", "gold reward", _gold_extra)(rows, summary, path)
    if get(summary, "eval.gold_reward.sft") is None and get(summary, "eval.gold_reward.ppo") is None:
        return None
    fig, (ax,) = _new_axes()
    _gold_extra(ax, rows, summary)
    ax.set_title("Gold reward on held-out prompts")
    return _finish(fig, [ax], path)


def _plot_dpo(rows, summary, path) -> Optional[str]:
    """Implicit rewards (left) and sequence log-probs (right) of chosen and rejected responses, train and held-out."""
    if not series(rows, "dpo", "dpo/loss")[0]:
        return None
    fig, (left, right) = _new_axes(2)
    for ax, key, what in ((left, "reward", "implicit reward"), (right, "logp", "log-prob")):
        for side, color in (("chosen", "#2ca02c"), ("rejected", "#d62728")):
            _line(ax, *series(rows, "dpo", f"dpo/{key}_{side}"), f"{side} (train batch)", color, alpha=0.5)
            _line(ax, *series(rows, "dpo", f"dpo/eval_{key}_{side}"), f"{side} (held-out)", color, linestyle="--")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(what)
    left.set_title("DPO: implicit rewards beta * log(pi / ref)")
    right.set_title("DPO: summed log-probs (chosen falling: a known failure)")
    return _finish(fig, [left, right], path)


def _policy_table(summary: dict) -> str:
    """The evaluated policies side by side: gold reward, win rates over SFT, RM score, length, EOS rate."""
    ev = summary.get("eval") or {}
    columns = [("gold reward", "gold_reward.{p}", "{:+.3f}"), ("gold win rate vs SFT", "win_rate_{p}_vs_sft", "{:.1%}"),
               ("gold win rate vs PPO", "win_rate_{p}_vs_ppo", "{:.1%}"), ("RM score", "rm_score.{p}", "{:+.3f}"),
               ("RM win rate vs SFT", "rm_win_rate_{p}_vs_sft", "{:.1%}"),
               ("response tokens", "response_length.{p}", "{:.1f}"), ("EOS rate", "eos_rate.{p}", "{:.0%}")]
    policies = [p for p in POLICIES if _finite(get(ev, f"response_length.{p}"))]
    columns = [c for c in columns if any(_finite(get(ev, c[1].format(p=p))) for p in policies)]
    if not policies:
        return "<p class='muted'>No evaluation results (the eval step has not run).</p>"
    head = "<tr><th>policy</th>" + "".join(f"<th>{html.escape(c[0])}</th>" for c in columns) + "</tr>"
    body = "".join("<tr><td>" + p.upper() + "</td>" + "".join(
        f"<td class='num'>{html.escape(fmt.format(v)) if _finite(v) else ''}</td>"
        for v, fmt in ((get(ev, key.format(p=p)), fmt) for _, key, fmt in columns)) + "</tr>" for p in policies)
    return f"<table>{head}{body}</table>"


def _plot_time_split(rows, summary, path) -> Optional[str]:
    timing = summary.get("timing", {})
    steps = [s for s in PIPELINE_STEPS if _finite(timing.get(f"{s}_seconds"))]
    ppo = summary.get("ppo", {})
    phases = [(k, ppo.get(f"{k}_seconds")) for k in ("generation", "scoring", "training")]
    phases = [(k, v) for k, v in phases if _finite(v)]
    if not steps and not phases:
        return None
    fig, axes = _new_axes(2 if steps and phases else 1)
    i = 0
    if steps:
        ax = axes[i]
        i += 1
        vals = [timing[f"{s}_seconds"] for s in steps]
        bars = ax.barh(steps[::-1], vals[::-1], color=[COLORS[s] for s in steps[::-1]])
        ax.bar_label(bars, labels=[f"{v:.0f}s" for v in vals[::-1]], fontsize=8, padding=2)
        ax.set_title(f"Wall time per step (total {sum(vals):.0f}s)")
        ax.set_xlabel("seconds (process start to exit)")
        ax.set_xlim(0, max(vals) * 1.2 if max(vals) > 0 else 1)
    if phases:
        ax = axes[i]
        total = ppo.get("seconds") if _finite(ppo.get("seconds")) else sum(v for _, v in phases)
        other = max(0.0, total - sum(v for _, v in phases))
        left = 0.0
        for (k, v), c in zip(phases + [("other", other)], ("#ff7f0e", "#17becf", "#d62728", "#c7c7c7")):
            ax.barh(["PPO"], [v], left=left, color=c, label=f"{k} {v:.1f}s")
            left += v
        ax.set_title("PPO time split")
        ax.set_xlabel("seconds")
        ax.set_ylim(-0.8, 1.2)
    return _finish(fig, axes, path)


def _plot_eval_hist(run_dir):
    def plot(rows, summary, path) -> Optional[str]:
        samples = _read_jsonl(os.path.join(run_dir, "eval", "samples.jsonl"))
        data = {n: [s[f"{n}_gold_reward"] for s in samples if _finite(s.get(f"{n}_gold_reward"))] for n in POLICIES}
        data = {n: v for n, v in data.items() if v}
        if not data:
            return None
        fig, (ax,) = _new_axes()
        lo = min(min(v) for v in data.values())
        hi = max(max(v) for v in data.values())
        bins = [lo + (hi - lo + 1e-9) * i / 20 for i in range(21)]
        for n, v in data.items():
            ax.hist(v, bins=bins, alpha=0.55, label=f"{n.upper()} policy (mean {sum(v) / len(v):.2f})",
                    color=POLICY_COLORS[n])
        ax.set_title("Gold reward per held-out prompt")
        ax.set_xlabel("gold reward")
        ax.set_ylabel("prompts")
        return _finish(fig, [ax], path)

    return plot


def make_plots(run_dir: str, rows: list[dict], summary: dict) -> list[tuple[str, str, Optional[str]]]:
    """Render every plot the data allows to `<run_dir>/plots/<name>.png`; [(name, title, path or None)]."""
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    specs = [
        ("lm_loss", "SFT (and pretraining) loss", _plot_lm_loss),
        ("rm_loss", "Reward model loss", _plot_rm_loss),
        ("rm_accuracy", "Reward model accuracy", _plot_rm_accuracy),
        ("ppo_reward", "PPO reward (RM score)", _ppo_plot("reward", "Step 3: PPO reward (RM score of rollouts)", "RM score", _reward_extra)),
        ("ppo_kl", "PPO KL to the reference", _ppo_plot("kl", "Step 3: KL(policy || reference) per response", "nats")),
        ("ppo_beta", "KL coefficient beta", _ppo_plot("beta", "Step 3: KL coefficient beta", "beta")),
        ("ppo_diversity", "Rollout diversity and reward-length correlation", _plot_diversity),
        ("gold_reward", "Gold reward", _plot_gold),
        ("response_length", "Response length", _ppo_plot("response_length", "Step 3: response length", "tokens", _length_extra)),
        ("dpo_rewards", "DPO implicit rewards and log-probs", _plot_dpo),
        ("eval_gold", "Gold reward per prompt, SFT vs PPO", _plot_eval_hist(run_dir)),
        ("time_split", "Time split", _plot_time_split),
    ]
    made = []
    for name, title, fn in specs:
        path = os.path.join(out_dir, f"{name}.png")
        result = fn(rows, summary, path)
        if result is None and os.path.exists(path):
            os.remove(path)  # stale plot of an earlier run
        made.append((name, title, result))
    return made


# ---- HTML --------------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out += _flat(v, key)
        elif not isinstance(v, list):
            out.append((key, v))
    return out


HEADLINES = [
    ("SFT eval loss", "sft.eval_loss", "{:.3f}"),
    ("RM eval accuracy", "rm.eval_accuracy", "{:.3f}"),
    ("RM Bayes ceiling", "rm.bayes_ceiling", "{:.3f}"),
    ("PPO reward (last 10%)", "ppo.reward_mean", "{:+.3f}"),
    ("PPO KL (last 10%)", "ppo.kl", "{:.3f}"),
    ("Distinct responses (last 10%)", "ppo.distinct_fraction", "{:.0%}"),
    ("corr(RM score, length)", "ppo.reward_length_corr", "{:+.2f}"),
    ("Gold reward SFT", "eval.gold_reward.sft", "{:+.3f}"),
    ("Gold reward PPO", "eval.gold_reward.ppo", "{:+.3f}"),
    ("Win rate PPO vs SFT", "eval.win_rate_ppo_vs_sft", "{:.1%}"),
    ("DPO held-out reward accuracy", "dpo.eval_reward_accuracy", "{:.3f}"),
    ("Gold reward DPO", "eval.gold_reward.dpo", "{:+.3f}"),
    ("Win rate DPO vs SFT", "eval.win_rate_dpo_vs_sft", "{:.1%}"),
    ("Win rate DPO vs PPO", "eval.win_rate_dpo_vs_ppo", "{:.1%}"),
    ("Total time", "timing.total_seconds", "{:.0f} s"),
]

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#777;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:140px}
.card .v{font-size:22px;font-weight:600} .card .k{font-size:12px;color:#666}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img{width:100%;height:auto} figure.wide{grid-column:1/-1} figure.wide img{max-width:1120px} figcaption{font-size:12px;color:#666}
table{border-collapse:collapse;background:#fff;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f0f0f0;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.resp{font-family:ui-monospace,Menlo,Consolas,monospace;max-width:420px}
.better{background:#e8f5e9} .worse{background:#fdecea}
.warn{color:#b00020;font-weight:600}
"""

# marks images that failed to decode (a broken report is visible, and checkable from a headless browser)
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0, bad = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok++; }
    else { bad++; var p = document.createElement('p'); p.className = 'warn';
           p.textContent = 'image failed to load: ' + img.alt; img.parentNode.insertBefore(p, img); }
  });
  document.body.setAttribute('data-images-ok', ok);
  document.body.setAttribute('data-images-broken', bad);
});
"""


def _sample_table(samples: list[dict], n: int) -> str:
    if not samples:
        return "<p class='muted'>No evaluation samples (the eval step has not run).</p>"
    policies = [p for p in POLICIES if f"{p}_response" in samples[0]]
    score_keys = [k for k in ("gold_reward", "rm_score") if any(f"{p}_{k}" in samples[0] for p in policies)]
    head = "<tr><th>#</th><th>prompt</th>" + "".join(
        f"<th>{p.upper()} response</th>" + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in score_keys)
        for p in policies) + "</tr>"
    body = []
    for i, s in enumerate(samples[:n]):
        cells = [f"<td class='num'>{i + 1}</td>", f"<td>{html.escape(s['prompt'])}</td>"]
        for p in policies:
            cells.append(f"<td class='resp'>{html.escape(s.get(f'{p}_response', ''))}</td>")
            for k in score_keys:
                v = s.get(f"{p}_{k}")
                other = s.get(f"sft_{k}")
                cls = ""
                if p != "sft" and _finite(v) and _finite(other) and v != other:
                    cls = " better" if v > other else " worse"
                cells.append(f"<td class='num{cls}'>{_fmt(v) if v is not None else ''}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _png_width(header: bytes) -> int:
    return int.from_bytes(header[16:20], "big") if header[:8] == b"\x89PNG\r\n\x1a\n" else 0


def render_html(run_dir: str, summary: dict, plots: list[tuple[str, str, Optional[str]]], samples: list[dict],
                n_samples: int = 16) -> str:
    cards = []
    for label, key, fmt in HEADLINES:
        v = get(summary, key)
        if _finite(v):
            cards.append(f"<div class='card'><div class='v'>{html.escape(fmt.format(v))}</div>"
                         f"<div class='k'>{html.escape(label)}</div></div>")
    figures, missing = [], []
    for name, title, path in plots:
        if path is None:
            missing.append(title)
            continue
        with open(path, "rb") as f:
            raw = f.read()
        data = base64.b64encode(raw).decode("ascii")
        cls = " class='wide'" if _png_width(raw) > 800 else ""  # two-panel figures take a whole row
        figures.append(f"<figure{cls}><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(title)} — <a href='plots/{name}.png'>plots/{name}.png</a>"
                       "</figcaption></figure>")
    steps = summary.get("steps", {})
    status = " · ".join(f"{s}: {html.escape(str(steps.get(s, 'missing')))}" for s in steps or PIPELINE_STEPS)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in _flat({k: v for k, v in summary.items() if k not in ("run_dir", "steps")}))
    missing_html = (f"<p class='muted'>No data for: {html.escape(', '.join(missing))}.</p>" if missing else "")
    title = f"RLHF run report — {os.path.basename(os.path.abspath(run_dir))}"
    rm_report = read_rm_report(run_dir)
    rm_section = (f"<h2>What the reward model rewards</h2>{rm_report_html(rm_report)}" if rm_report else
                  "<h2>What the reward model rewards</h2><p class='muted'>Not computed: run <code>rlhf-ds rm-report "
                  "&lt;run&gt;/rm --pairs PAIRS --samples &lt;run&gt;/eval/samples.jsonl -o &lt;run&gt;</code>, then "
                  "<code>rlhf-ds report &lt;run&gt;</code>.</p>")
    collapse = get(summary, "ppo.collapse_warning_steps") or []
    collapse_html = ("<p class='warn'>PPO rollouts collapsed: the fraction of distinct responses or of distinct bigrams "
                     "stayed below its threshold for several steps in a row (warned at steps "
                     f"{', '.join(map(str, collapse))}). A rising reward then says little; read the rollout diversity "
                     "plot and the highest-scoring responses below.</p>" if collapse else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="muted">{html.escape(summary.get('run_dir', run_dir))} · steps: {status}</div>
<div class="cards">{''.join(cards)}</div>
{collapse_html}
<h2>Training curves</h2>
<div class="plots">{''.join(figures)}</div>
{missing_html}
<h2>Policies side by side (held-out prompts)</h2>
{_policy_table(summary)}
<h2>Responses before and after PPO</h2>
<p class="muted">The same held-out prompts answered by the SFT policy and by the PPO policy
(first {min(n_samples, len(samples))} of {len(samples)}; all in <a href="eval/samples.jsonl">eval/samples.jsonl</a>).
PPO (and DPO) scores are green where they beat SFT, red where they lose.</p>
{_sample_table(samples, n_samples)}
{rm_section}
<h2>All figures</h2>
<p class="muted"><a href="summary.json">summary.json</a> · <a href="metrics.jsonl">metrics.jsonl</a> ·
<a href="config.yaml">config.yaml</a></p>
<table><tr><th>key</th><th>value</th></tr>{rows}</table>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(run_dir: str) -> dict:
    """Write summary.json, metrics.jsonl, plots/*.png and report.html into `run_dir`; returns the summary."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    summary = collect_summary(run_dir)
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    rows = concat_metrics(run_dir)
    atomic_write_text(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    plots = make_plots(run_dir, rows, summary)
    samples = _read_jsonl(os.path.join(run_dir, "eval", "samples.jsonl"))
    atomic_write_text(os.path.join(run_dir, "report.html"), render_html(run_dir, summary, plots, samples))
    return summary
