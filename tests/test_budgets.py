"""Token budgets from the data and the model: derived where unset, refused (exit 2, before any model loads) where they
would cut more than `data.max_cut_share` of the examples or exceed the model's positions."""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import run_cli
from rlhf_ds.config import ConfigError, DataConfig
from rlhf_ds.data.formats import load_preferences, load_prompts, load_sft
from rlhf_ds.data.readers import DataError
from rlhf_ds.steps.common import fit_budgets


RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "rewards", "builtin_rules.py")


class Cfg:
    def __init__(self, **data):
        self.data = DataConfig(**data)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from dist_hybrid_models import tiny_models

    return tiny_models(tmp_path_factory)  # GPT-2 style, 96 positions


@pytest.fixture(scope="module")
def tok(models):
    from rlhf_ds.models.loading import load_tokenizer

    return load_tokenizer(models["gpt2"])


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def prompt_rows(n_long: int, n_short: int = 20) -> list[dict]:
    return [{"prompt": "tell me about the red fox " * 6} for _ in range(n_long)] + \
        [{"prompt": f"hi {i}"} for i in range(n_short)]


def test_unset_budgets_come_from_the_longest_prompt_and_example(tok, models, tmp_path):
    prompts, _ = load_prompts(write_jsonl(tmp_path / "p.jsonl", prompt_rows(1)))
    cfg = Cfg()
    said = fit_budgets(cfg, tok, prompts, models["gpt2"], new_tokens=24)
    longest = len(tok(prompts[0].prompt)["input_ids"]) + (tok.bos_token_id is not None)
    assert cfg.data.max_prompt_tokens == longest and cfg.data.max_seq_len == longest + 24
    assert f"max_prompt_tokens {longest} (the longest prompt: {longest})" in said

    pairs, _ = load_preferences(write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "q", "chosen": "a much longer answer than the other one", "rejected": "no"}]))
    cfg = Cfg()
    fit_budgets(cfg, tok, pairs, models["gpt2"])
    chosen = len(tok(pairs[0].chosen)["input_ids"])
    assert cfg.data.max_seq_len == cfg.data.max_prompt_tokens + chosen + 1  # prompt + the longer side + EOS

    # the model's positions bound what is derived: 96 positions, 90 new tokens leave 6 for the prompt
    cfg = Cfg(max_cut_share=1.0)
    fit_budgets(cfg, tok, prompts, models["gpt2"], new_tokens=90)
    assert cfg.data.max_prompt_tokens == 6 and cfg.data.max_seq_len == 96


def test_budgets_that_cut_too_many_examples_are_refused_naming_the_key_and_the_longest_row(tok, models, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows(2))
    prompts, _ = load_prompts(path)
    with pytest.raises(DataError, match=r"2 of 22 examples \(9\.1%\) have prompts.*data\.max_prompt_tokens=8 .*p\.jsonl: row 1.*"
                                        r"raise data\.max_prompt_tokens to \d+ \(the model has 96 positions\)"):
        fit_budgets(Cfg(max_prompt_tokens=8), tok, prompts, models["gpt2"], new_tokens=24)
    fit_budgets(Cfg(max_prompt_tokens=8, max_cut_share=0.1), tok, prompts, models["gpt2"], new_tokens=24)  # allowed

    sft, _ = load_sft(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "word " * 40}] +
                                  [{"prompt": "q", "response": "ok"}] * 3))
    with pytest.raises(DataError, match=r"1 of 4 examples .*sequences \(prompt \+ response \+ EOS\) longer than "
                                        r"data\.max_seq_len=16.*s\.jsonl: row 1"):
        fit_budgets(Cfg(max_seq_len=16), tok, sft, models["gpt2"])


def test_budgets_beyond_the_models_positions_are_refused(tok, models, tmp_path):
    prompts, _ = load_prompts(write_jsonl(tmp_path / "p.jsonl", prompt_rows(0)))
    with pytest.raises(ConfigError, match=r"data\.max_prompt_tokens \+ generation\.max_new_tokens \(100\) exceeds the "
                                          r"96 positions .*config\.json n_positions"):
        fit_budgets(Cfg(max_prompt_tokens=76), tok, prompts, models["gpt2"], new_tokens=24)
    sft, _ = load_sft(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "ok"}]))
    with pytest.raises(ConfigError, match=r"data\.max_seq_len \(512\) exceeds the 96 positions"):
        fit_budgets(Cfg(max_seq_len=512), tok, sft, models["gpt2"])


@pytest.mark.parametrize("case", ["all_prompts_too_long", "beyond_positions", "unknown_role"])
def test_cli_refuses_before_any_model_loads(models, tmp_path, case):
    out = tmp_path / "run"
    prompts = {
        "all_prompts_too_long": [{"prompt": "tell me about the red fox " * 6}] * 8,
        "beyond_positions": [{"prompt": "hi"}] * 8,
        "unknown_role": [{"messages": [{"role": "user", "content": "hi"}]}] * 3 +
                        [{"messages": [{"role": "wizard", "content": "hi"}]}],
    }[case]
    extra = {"all_prompts_too_long": ["data.max_prompt_tokens=8"],
             "beyond_positions": ["generation.max_new_tokens=120"], "unknown_role": []}[case]
    proc = run_cli(["ppo", f"output_dir={out}", f"actor.model={models['gpt2']}", "reward.model=null",
                    f"reward.function={RULES}:on_topic",
                    "ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=2", "ppo.rollout_batch_size=2", "ppo.micro_batch_size=4",
                    f"data.train={write_jsonl(tmp_path / 'prompts.jsonl', prompts)}", *extra], check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "loading " not in text and not os.path.exists(out / "config.yaml")
    expected = {"all_prompts_too_long": r"8 of 8 prompts \(100\.0%\).*data\.max_prompt_tokens=8.*prompts\.jsonl: row 1",
                "beyond_positions": r"generation\.max_new_tokens \(\d+\) exceeds the 96 positions",
                "unknown_role": r"prompts\.jsonl row 4, field 'messages\[0\]\.role': unknown role 'wizard'"}[case]
    assert re.search(expected, text), text[-3000:]
