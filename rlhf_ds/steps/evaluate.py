"""Final evaluation (`rlhf-ds eval`) and the plain-transformers tools behind `rlhf-ds generate`, `score` and `chat`.

Evaluation: on held-out prompts (the built-in task's `eval_prompts.jsonl` by default) the SFT and the PPO policy (and
the DPO policy, when given) each answer (sampled at T=1 by default, several samples per prompt, batched, left-padded,
one process, no DeepSpeed engine); every response is scored by the gold reward (built-in task only) and by the reward model. Reported: mean gold reward and mean RM score of each policy,
the win rates of PPO (and DPO) over SFT, and of DPO over PPO, by gold reward (ties count 0.5) and by RM score,
response lengths and EOS rates. With `reward_function` (a verifiable reward, called as PPO's reward.function with the
prompt rows' other columns) or `reward_url` (a reward served by `rlhf-ds serve-reward`, as PPO's reward.url), also per
policy (the key `function_reward` holds either's scores): the mean function reward, the accuracy (share of sampled responses whose
reward is >= `pass_threshold`), the unbiased pass@k for each k of `pass_k` (Chen et al. 2021) and, with `greedy_pass`,
the share of greedy answers (one per prompt) that pass. Written:
`<output_dir>/results.json` and `samples.jsonl` (one line per prompt and sample: every policy's response and its
scores; sample j of prompt i is line j * n_prompts + i; the first n_prompts lines also hold the greedy answers).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from rlhf_ds.config import ConfigError, EvalConfig, GenerationConfig, save_config, to_dict
from rlhf_ds.engine.launcher import threads_per_process
from rlhf_ds.models.loading import max_positions, pick_device
from rlhf_ds.models.scalar_head import reward_scorer
from rlhf_ds.utils import atomic_write_json, atomic_write_text, is_rank0

log = logging.getLogger("rlhf_ds")

POLICIES = ("sft", "ppo", "dpo")


# ---- loading and generation -------------------------------------------------------------------------------------------
def load_policy(path: str, device: str = "cpu", precision: str = "fp32", trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer) from a model folder or a step run folder holding `model/`."""
    from rlhf_ds.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_causal_lm(path, {}, precision, disable_dropout=True, trust_remote_code=trust_remote_code,
                           tokenizer=tokenizer)
    return model.to(device).eval(), tokenizer


def prompt_budget(model, max_new_tokens: int, max_prompt_tokens: Optional[int] = None) -> int:
    """Prompt tokens a tool may give `model`: the asked limit (--max-prompt-tokens), else the model's positions less
    the --max-new-tokens to generate; refused when no token of prompt or response would fit."""
    positions = max_positions(model.config)
    budget = max_prompt_tokens or (positions - max_new_tokens if positions else 256)
    if positions is not None and budget >= positions:
        raise ConfigError(f"--max-prompt-tokens {budget} leaves no room to generate within the model's {positions} "
                          "positions")
    if budget < 2:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt within the model's "
                          f"{positions} positions")
    return budget


def fit_prompts(prompts: list[str], tokenizer, budget: int, overflow: str, what: str = "prompts") -> list[int]:
    """Indices of the prompts to keep: all of them with overflow="truncate" (left-truncated later, as in training),
    the ones within `budget` tokens with "skip". Says on stderr how many were long and which rows (1-based)."""
    from rlhf_ds.data.features import prompt_features
    from rlhf_ds.data.formats import PromptExample

    whole, _ = prompt_features([PromptExample(prompt=p) for p in prompts], tokenizer, 1 << 30)
    long = [i for i, ids in enumerate(whole) if len(ids) > budget]
    if long:
        shown = ", ".join(str(i + 1) for i in long[:10]) + (f" and {len(long) - 10} more" if len(long) > 10 else "")
        done = "left-truncated to fit" if overflow == "truncate" else "skipped"
        print(f"{len(long)} of {len(prompts)} {what} are longer than {budget} tokens and were {done}: row {shown}",
              file=sys.stderr)
    return list(range(len(prompts))) if overflow == "truncate" else sorted(set(range(len(prompts))) - set(long))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], gen: GenerationConfig, batch_size: int = 16,
             max_prompt_tokens: int = 256) -> list[dict]:
    """Responses to prompt texts: [{"response", "response_tokens", "eos"}], in the order of `prompts`.

    Prompts are encoded as in training (BOS + prompt, left-truncated to `max_prompt_tokens`), batched by length and
    left-padded; a response ends at its first EOS. A response is the decoded text of its tokens, whitespace included
    (not stripped: after a prompt ending "Assistant:" it starts with the space the model wrote, so prompt + response is
    the text it produced and scores as PPO's rollouts do). Sampling draws from torch's global generator (seed it
    first).
    """
    from rlhf_ds.data.features import pad_batch, prompt_features
    from rlhf_ds.data.formats import PromptExample
    from rlhf_ds.rollout.base import response_mask, sampling_kwargs, with_response_column

    if not prompts:
        return []
    ids, _ = prompt_features([PromptExample(prompt=p) for p in prompts], tokenizer, max_prompt_tokens, "truncate")
    limit = max_positions(model.config)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Optional[dict]] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in chunk], tokenizer.pad_token_id, side="left")
        P = input_ids.shape[1]
        new = gen.max_new_tokens if limit is None else min(gen.max_new_tokens, limit - P)
        if new <= 0:
            raise ValueError(f"prompts of {P} tokens leave no room to generate within the model's {limit} positions; "
                             "lower max_prompt_tokens")
        seq = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             **sampling_kwargs(gen, tokenizer.pad_token_id, tokenizer.eos_token_id, new))
        responses = with_response_column(seq, P, tokenizer.pad_token_id)[:, P:].cpu()
        rmask, has_eos = response_mask(responses, tokenizer.eos_token_id)
        for row, i in enumerate(chunk):
            kept = responses[row][rmask[row].bool()]
            out[i] = {"response": tokenizer.decode(kept, skip_special_tokens=True),
                      "response_tokens": int(rmask[row].sum()), "eos": bool(has_eos[row])}
    return out  # type: ignore[return-value]


# ---- evaluation --------------------------------------------------------------------------------------------------------
def _mean(xs: Iterable[float]) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def win_rate(a: list[float], b: list[float], tol: float = 1e-9) -> float:
    """Fraction of items where `a` beats `b`; ties count one half."""
    if len(a) != len(b) or not a:
        raise ValueError("win_rate needs two equally long, non-empty lists")
    return sum(1.0 if x > y + tol else 0.5 if abs(x - y) <= tol else 0.0 for x, y in zip(a, b)) / len(a)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k
    samples drawn without replacement from the n hold at least one pass. Computed as a product (no huge binomials):
    C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k / i). ValueError unless 0 <= c <= n and 1 <= k <= n."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass_at_k: needs n >= 0, c >= 0 and k >= 1 (n={n}, c={c}, k={k})")
    if k > n or c > n:
        raise ValueError(f"pass_at_k: needs k <= n and c <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every draw of k holds a pass
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(passes: Sequence[Sequence[bool]], k: int) -> Optional[float]:
    """pass@k averaged over prompts; `passes[i]` holds whether each sample of prompt i passed (None: no prompts)."""
    return _mean(pass_at_k(len(p), sum(bool(x) for x in p), k) for p in passes)


def score_function(reward, prompts: list[str], rows: list[dict], columns: list[dict], threshold: float) -> None:
    """Each generated row gets "function_reward" (the FunctionReward `reward` of its prompt and response, the prompt
    row's `columns` passed on) and "passed" (reward >= `threshold`)."""
    from rlhf_ds.rewards.base import RewardBatch

    scores = reward(RewardBatch(list(prompts), [r["response"] for r in rows], list(columns))).tolist()
    for row, s in zip(rows, scores):
        row["function_reward"] = float(s)
        row["passed"] = float(s) >= threshold


def _builtin_prompts(cfg: EvalConfig, out_dir: str) -> str:
    from rlhf_ds.data.builtin_task import BuiltinTask

    path = os.path.join(out_dir, "data", "eval_prompts.jsonl")
    rows = BuiltinTask(cfg.task.seed).eval_prompts()
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cfg: EvalConfig) -> dict:
    """Generate with each policy, score, write results.json and samples.jsonl. Rank 0 only (other ranks return)."""
    if not is_rank0():
        return {}
    from rlhf_ds.data.features import render_prompt
    from rlhf_ds.data.formats import load_prompts
    from rlhf_ds.tracking.metrics import MetricsLogger, setup_logging

    t_start = time.time()
    out_dir = cfg.output_dir
    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    setup_logging(out_dir)
    metrics = MetricsLogger(out_dir, "eval", cfg.tracking, to_dict(cfg))
    torch.set_num_threads(threads_per_process())  # (the CLI has said the number)

    gold_fn: Optional[Callable[[str, str], float]] = None
    best_fn = None
    source = cfg.prompts
    if source is None:
        from rlhf_ds.data.builtin_task import BuiltinTask

        task = BuiltinTask(cfg.task.seed)
        gold_fn, best_fn = task.gold_reward, task.best_gold
        source = _builtin_prompts(cfg, out_dir)
    examples, report = load_prompts(source, template=cfg.template)
    if cfg.max_prompts:
        examples = examples[: cfg.max_prompts]
    log.info("eval prompts %s: %s; evaluating %d", source, report.summary(), len(examples))
    device = pick_device(cfg.device)
    models = {name: getattr(cfg, f"{name}_model") for name in POLICIES if getattr(cfg, f"{name}_model")}
    n_prompts = len(examples)
    function = None  # the verifier: a Python function or a served reward, scored per response (pass, pass@k)
    if cfg.reward_function:
        from rlhf_ds.rewards.function import FunctionReward

        function = FunctionReward(cfg.reward_function)
    elif cfg.reward_url:
        from rlhf_ds.rewards.remote import RemoteReward

        function = RemoteReward(cfg.reward_url, token_file=cfg.reward_token_file)
    greedy_gen = dataclasses.replace(cfg.generation, do_sample=False)
    greedy: dict[str, list[dict]] = {}  # one greedy answer per prompt and policy (reward_function with greedy_pass)

    prompts: Optional[list[str]] = None
    gens: dict[str, list[dict]] = {}
    for name, path in models.items():
        t0 = time.time()
        model, tokenizer = load_policy(path, device, cfg.precision, cfg.trust_remote_code)
        if prompts is None:  # each prompt k times: sample j of both policies is compared with the same seed stream
            prompts = [render_prompt(tokenizer, ex) for ex in examples] * cfg.samples_per_prompt
        torch.manual_seed(cfg.seed)
        budget = prompt_budget(model, cfg.generation.max_new_tokens, cfg.max_prompt_tokens)
        gens[name] = generate(model, tokenizer, prompts, cfg.generation, cfg.batch_size, budget)
        if function is not None and cfg.greedy_pass:
            if cfg.generation.do_sample:
                torch.manual_seed(cfg.seed)
                greedy[name] = generate(model, tokenizer, prompts[:n_prompts], greedy_gen, cfg.batch_size, budget)
            else:  # the samples are greedy already: the first one of each prompt is the greedy answer
                greedy[name] = [dict(r) for r in gens[name][:n_prompts]]
        del model
        log.info("eval: %s policy (%s) answered %d prompts in %.1fs", name, path, len(prompts), time.time() - t0)
    assert prompts is not None

    if gold_fn is not None:
        for name, rows in gens.items():
            for p, row in zip(prompts, rows):
                row["gold_reward"] = gold_fn(p, row["response"])
    if cfg.reward_model:
        scorer = reward_scorer(cfg.reward_model, device, cfg.precision, budget,
                               cfg.generation.max_new_tokens)
        for name, rows in gens.items():
            scores = scorer.score(prompts, [r["response"] for r in rows], batch_size=cfg.batch_size)
            for row, s in zip(rows, scores):
                row["rm_score"] = float(s)
        del scorer
    if function is not None:
        columns = [examples[i % n_prompts].columns for i in range(len(prompts))]  # sample j of prompt i: j * n + i
        for name in gens:
            score_function(function, prompts, gens[name], columns, cfg.pass_threshold)
            if name in greedy:
                score_function(function, prompts[:n_prompts], greedy[name], columns[:n_prompts], cfg.pass_threshold)

    def per_policy(key: str) -> Optional[dict]:
        values = {name: _mean(r[key] for r in rows if key in r) for name, rows in gens.items()}
        return values if any(v is not None for v in values.values()) else None

    def wins(key: str, a: str = "ppo", b: str = "sft") -> Optional[float]:
        if not {a, b} <= set(gens) or key not in gens[b][0]:
            return None
        return win_rate([r[key] for r in gens[a]], [r[key] for r in gens[b]])

    verified: dict = {}
    if function is not None:
        ks = sorted(set(cfg.pass_k or [1, cfg.samples_per_prompt]))
        groups = {name: [[rows[j * n_prompts + i]["passed"] for j in range(cfg.samples_per_prompt)]
                         for i in range(n_prompts)] for name, rows in gens.items()}
        verified = {
            "reward_function": cfg.reward_function,
            "reward_url": cfg.reward_url,
            "pass_threshold": cfg.pass_threshold,
            "function_reward": per_policy("function_reward"),
            "accuracy": {name: _mean(float(r["passed"]) for r in rows) for name, rows in gens.items()},
            "pass_at_k": {name: {str(k): mean_pass_at_k(g, k) for k in ks} for name, g in groups.items()},
        }
        if greedy:
            verified["greedy_accuracy"] = {name: _mean(float(r["passed"]) for r in rows) for name, rows in greedy.items()}
        for name in gens:
            log.info("eval: %s policy, reward %s: accuracy %s, pass@k %s%s", name, cfg.reward_function or cfg.reward_url,
                     verified["accuracy"][name], verified["pass_at_k"][name],
                     f", greedy accuracy {verified['greedy_accuracy'][name]}" if name in greedy else "")

    results = {
        "n_prompts": len(prompts) // cfg.samples_per_prompt,
        "samples_per_prompt": cfg.samples_per_prompt,
        "gold_reward": per_policy("gold_reward"),
        "win_rate_ppo_vs_sft": wins("gold_reward"),
        "rm_score": per_policy("rm_score"),
        "rm_win_rate_ppo_vs_sft": wins("rm_score"),
        "response_length": per_policy("response_tokens"),
        "eos_rate": {name: _mean(float(r["eos"]) for r in rows) for name, rows in gens.items()},
        **verified,
        "prompts": source,
        "models": {**{name: path for name, path in models.items()}, "reward": cfg.reward_model},
        "greedy": not cfg.generation.do_sample,
    }
    if "dpo" in gens:  # the offline branch, side by side with SFT (and PPO when both ran)
        for key, prefix in (("gold_reward", "win_rate"), ("rm_score", "rm_win_rate")):
            results[f"{prefix}_dpo_vs_sft"] = wins(key, "dpo", "sft")
            results[f"{prefix}_dpo_vs_ppo"] = wins(key, "dpo", "ppo")
    if best_fn is not None and results["gold_reward"] is not None:
        results["gold_reward"]["best"] = _mean(best_fn(p) for p in prompts)
    results["seconds"] = time.time() - t_start

    samples = []
    for i, p in enumerate(prompts):
        row: dict = {"prompt": p}
        for name, rows in gens.items():
            row[f"{name}_response"] = rows[i]["response"]
            for key in ("gold_reward", "rm_score", "function_reward"):
                if key in rows[i]:
                    row[f"{name}_{key}"] = rows[i][key]
        for name, rows in greedy.items():  # the first n_prompts lines: sample 0 of each prompt
            if i < len(rows):
                row[f"{name}_greedy_response"] = rows[i]["response"]
                row[f"{name}_greedy_function_reward"] = rows[i]["function_reward"]
        samples.append(row)
    atomic_write_text(os.path.join(out_dir, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in samples))
    atomic_write_json(os.path.join(out_dir, "results.json"), results)

    flat = {k: v for k, v in flatten(results, "eval").items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.log(flat, step=0)
    metrics.summary({k.split("/", 1)[1]: v for k, v in flat.items()})
    metrics.close()
    return results


def flatten(tree: dict, prefix: str = "", sep: str = "/") -> dict:
    """{"a": {"b": 1}} -> {"prefix/a/b": 1}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


# ---- rlhf-ds generate / score / chat ----------------------------------------------------------------------------------
GENERATED_COLUMNS = ("prompt", "response", "response_tokens", "eos", "sample")


def generate_file(model_path: str, prompts_path: str, output: str, gen: GenerationConfig, batch_size: int = 16,
                  max_prompt_tokens: Optional[int] = None, num_samples: int = 1, limit: int = 0, seed: int = 1234,
                  device: str = "auto", precision: str = "fp32", fmt: str = "auto",
                  trust_remote_code: bool = False, prompt_overflow: str = "truncate") -> list[dict]:
    """Prompts file (any prompt format the data readers accept) -> responses JSONL, written atomically: each input row
    whole (a reference answer, ids, metadata ...) with the rendered `prompt`, `response`, `response_tokens`, `eos` (and
    `sample`); an input column of one of these names that holds something else is kept as `input_<name>`. Prompts
    longer than the budget (`prompt_budget`) are left-truncated or skipped (`prompt_overflow`), counted and named by
    row."""
    from rlhf_ds.data.features import render_prompt
    from rlhf_ds.data.formats import parse_prompts
    from rlhf_ds.data.readers import DataError, read_records

    records = read_records(prompts_path)
    if not records:
        raise DataError("no rows found", file=str(prompts_path))
    records = records[:limit] if limit else records
    examples, _ = parse_prompts(records, fmt=fmt)  # one example per row (a bad row is an error)
    model, tokenizer = load_policy(model_path, pick_device(device), precision, trust_remote_code)
    budget = prompt_budget(model, gen.max_new_tokens, max_prompt_tokens)
    rendered = [render_prompt(tokenizer, ex) for ex in examples]
    keep = fit_prompts(rendered, tokenizer, budget, prompt_overflow, f"prompts in {prompts_path}")
    prompts = [rendered[i] for i in keep]
    renamed: set[str] = set()

    def output_row(i: int, generated: dict) -> dict:
        row = {**records[i].data}
        new = {"prompt": rendered[i], **generated}
        for key in GENERATED_COLUMNS:
            if key in row and key in new and row[key] != new[key]:
                row[f"input_{key}"] = row.pop(key)
                renamed.add(key)
        return {**row, **new}

    torch.manual_seed(seed)
    rows = []
    for k in range(num_samples):
        for i, g in zip(keep, generate(model, tokenizer, prompts, gen, batch_size, budget)):
            rows.append((i, k, output_row(i, {**g, **({"sample": k} if num_samples > 1 else {})})))
    rows.sort(key=lambda r: r[:2])  # input order, then sample
    if renamed:
        print(f"input columns {', '.join(sorted(renamed))} are kept as "
              f"{', '.join('input_' + key for key in sorted(renamed))} (generate writes its own)", file=sys.stderr)
    out = [row for _, _, row in rows]
    atomic_write_text(output, "".join(json.dumps(r) + "\n" for r in out))
    return out


def score_file(model_path: str, input_path: str, output: str, batch_size: int = 32, normalised: bool = True,
               max_prompt_tokens: int = 256, max_new_tokens: int = 256, device: str = "auto", precision: str = "fp32",
               fmt: str = "auto") -> list[dict]:
    """Prompt/response rows (prompt+response, prompt+completion or chat messages) -> rows with a reward-model "score"."""
    from rlhf_ds.data.features import render_prompt, render_response
    from rlhf_ds.data.formats import SFTExample, parse_sft
    from rlhf_ds.data.readers import read_records

    records = read_records(input_path)
    if fmt == "auto" and records and all(isinstance(r.data.get("prompt"), str) and isinstance(r.data.get("response"), str)
                                         for r in records):
        # a policy's output (e.g. from `rlhf-ds generate`) may be empty, which SFT data parsing rejects as a bad row
        examples = [SFTExample(prompt=r.data["prompt"], response=r.data["response"]) for r in records]
    else:
        examples, _ = parse_sft(records, fmt=fmt)
    scorer = reward_scorer(model_path, pick_device(device), precision, max_prompt_tokens, max_new_tokens)
    prompts = [render_prompt(scorer.tokenizer, ex) for ex in examples]
    responses = [render_response(scorer.tokenizer, ex) for ex in examples]
    scores = scorer.score(prompts, responses, batch_size=batch_size, normalised=normalised)
    # each input row comes back whole (ids, references, metadata), with the texts that were scored and the score
    rows = [{**record.data, "prompt": p, "response": r, "score": float(s)}
            for record, p, r, s in zip(records, prompts, responses, scores)]
    atomic_write_text(output, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def chat_loop(model_path: str, gen: GenerationConfig, template: Optional[str] = None, reward_model: Optional[str] = None,
              gold_seed: Optional[int] = None, max_prompt_tokens: Optional[int] = None, device: str = "auto",
              precision: str = "fp32", seed: int = 1234, stdin=None, stdout=None) -> int:
    """Read one message per line, print the model's reply (and its RM / gold score when asked). Ends at EOF or /quit.

    The prompt is `template` with `{input}` replaced, else the tokenizer's chat template when it has one, else the
    line as typed. Each line is answered on its own (no history): these are small single-turn models.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    dev = pick_device(device)
    model, tokenizer = load_policy(model_path, dev, precision)
    max_prompt_tokens = prompt_budget(model, gen.max_new_tokens, max_prompt_tokens)
    scorer = reward_scorer(reward_model, dev, precision, max_prompt_tokens, gen.max_new_tokens) if reward_model else None
    gold = None
    if gold_seed is not None:
        from rlhf_ds.data.builtin_task import BuiltinTask

        gold = BuiltinTask(gold_seed).gold_reward
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    torch.manual_seed(seed)
    turns = 0
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if template:
            prompt = template.replace("{input}", text)
        elif getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = text
        reply = generate(model, tokenizer, [prompt], gen, 1, max_prompt_tokens)[0]
        notes = []
        if scorer is not None:
            notes.append(f"rm {scorer.score([prompt], [reply['response']])[0]:+.3f}")
        if gold is not None:
            notes.append(f"gold {gold(prompt, reply['response']):+.3f}")
        if not reply["eos"]:
            notes.append("no eos")
        suffix = f"   [{', '.join(notes)}]" if notes else ""
        print(f"model> {reply['response']}{suffix}", file=stdout, flush=True)
        turns += 1
    return turns
