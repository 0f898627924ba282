"""Hostile input, end to end through the real CLI: each entry point refuses bad data and broken model folders early,
with exit status 2, one `rlhf-ds <step>: <message>` line naming the file, row and field (or the folder and what is
missing), and no partial output (the run directory holds at most `logs/`). The two handled cases (a tokenizer with no
PAD token, PAD == EOS) run to the end with a distinct PAD, said in the log and kept in the saved tokenizer.

Rows count from 1 (a JSONL row is its line number: `row 3` is line 3, which malformed-JSON messages name as `line 3`).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from conftest import run_cli

SUBJECTS = ["red fox", "old boat", "tall tree", "small bird", "green hill", "quiet lake", "warm bread", "bright star"]
SFT_ROWS = [{"prompt": f"human : describe the {s} . assistant :", "response": f" the {s} is nice ."} for s in SUBJECTS]
PREF_ROWS = [{"prompt": f"human : describe the {s} . assistant :", "chosen": f" the {s} is nice .",
              "rejected": f" {s} {s} {s}"} for s in SUBJECTS]
SHORT = ["train.max_steps=2", "train.micro_batch_size=2", "engine.zero_stage=0"]


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def with_row(rows: list[dict], index: int, **fields) -> list[dict]:
    """`rows` with `fields` changed in row `index` (a copy)."""
    out = [dict(r) for r in rows]
    out[index].update(fields)
    return out


def train(step: str, tmp_path, data: str, model: str, *extra: str):
    """A short sft/rm run on `data` (train and eval) from `model`; (process, run dir)."""
    out = str(tmp_path / "out")
    proc = run_cli([step, f"output_dir={out}", f"model={model}", f"data.train={data}", f"data.eval={data}", *SHORT,
                    *extra], check=False)
    return proc, out


def assert_refused(proc, step: str, message: str, out: str | None = None, output_file: str | None = None) -> None:
    """The run stopped with `message` (validation), exit status 2 and `rlhf-ds <step>: ...` (CLI contract), and
    wrote nothing but logs/ and the run-directory lock `.lock`, both taken before any input is read (ordering
    contract; rlhf_ds/run_lock.py)."""
    err = proc.stderr
    assert message in err, f"expected {message!r} in stderr (exit {proc.returncode}):\n{err[-4000:]}"
    assert proc.returncode == 2, f"exit status {proc.returncode}, expected 2:\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf-ds {step}: ")]
    assert lines and message in lines[-1], f"no 'rlhf-ds {step}: ...{message}' line in stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    if out is not None and os.path.exists(out):
        left = sorted(set(os.listdir(out)) - {"logs", ".lock"})
        assert not left, f"partial output left in {out}: {left}"
    if output_file is not None:
        folder = os.path.dirname(output_file)
        assert not os.path.exists(output_file) and os.listdir(folder) == [], os.listdir(folder)


def model_copy(tiny_base: str, tmp_path, name: str = "model") -> str:
    """A private copy of the tiny model folder, to break."""
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(tiny_base, "model"), dst)
    return dst


def edit_json(path: str, change) -> None:
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    change(value)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def saved_pad_and_eos(model_dir: str) -> tuple[int, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.pad_token_id, tok.eos_token_id


# ---- data ----------------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line(tiny_base, tmp_path):
    broken = '{"prompt": "p", "response": '
    data = write_jsonl(tmp_path / "sft.jsonl", [*SFT_ROWS[:2], broken, *SFT_ROWS[2:]])
    proc, out = train("sft", tmp_path, data, tiny_base)
    assert_refused(proc, "sft", f"{data} row 3: malformed JSON on line 3: Expecting value (column 29)", out)


def test_malformed_json_file(tiny_base, tmp_path):
    text = json.dumps(PREF_ROWS, indent=1).replace('"rejected": " old boat old boat old boat"', '"rejected": ')
    data = tmp_path / "prefs.json"
    data.write_text(text, encoding="utf-8")
    line = text[: text.index('"rejected": \n')].count("\n") + 2  # the value is missing: the error is on the next line
    proc, out = train("rm", tmp_path, str(data), tiny_base)
    assert_refused(proc, "rm", f"{data}: malformed JSON on line {line}: Expecting value", out)


@pytest.mark.parametrize("step, field, value, shown", [
    ("sft", "response", 42, "int 42"),
    ("rm", "chosen", ["good", "answer"], "list ['good', 'answer']"),
    ("ppo", "prompt", {"text": "hi"}, "dict {'text': 'hi'}"),
])
def test_wrong_column_type(tiny_base, tmp_path, step, field, value, shown):
    rows = SFT_ROWS if step == "sft" else PREF_ROWS
    data = write_jsonl(tmp_path / "data.jsonl", with_row(rows, 3, **{field: value}))
    if step == "ppo":
        out = str(tmp_path / "out")
        proc = run_cli(["ppo", f"output_dir={out}", f"actor.model={tiny_base}", f"reward.model={tiny_base}",
                        f"data.train={data}", "ppo.steps=1"], check=False)
    else:
        proc, out = train(step, tmp_path, data, tiny_base)
    assert_refused(proc, step, f"{data} row 4, field '{field}': expected text, got {shown}", out)


@pytest.mark.parametrize("text, detail", [("", "empty text"), ("  \n\t ", "empty text (only whitespace)")])
def test_empty_text(tiny_base, tmp_path, text, detail):
    data = write_jsonl(tmp_path / "sft.jsonl", with_row(SFT_ROWS, 5, response=text))
    proc, out = train("sft", tmp_path, data, tiny_base)
    assert_refused(proc, "sft", f"{data} row 6, field 'response': {detail}", out)


def test_huge_text(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", with_row(SFT_ROWS, 1, prompt="word " * 200_001))
    proc, out = train("sft", tmp_path, data, tiny_base)
    assert_refused(proc, "sft", f"{data} row 2, field 'prompt': text of 1,000,005 characters exceeds the "
                                "1,000,000-character limit", out)


def test_huge_text_skipped_and_counted_with_on_bad_row_skip(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [*SFT_ROWS, {"prompt": "p", "response": "x" * 1_000_001}])
    proc, out = train("sft", tmp_path, data, tiny_base, "data.on_bad_row=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "9 rows, kept 8, skipped 1 (text too long: 1)" in proc.stderr
    assert os.path.isdir(os.path.join(out, "model"))


def test_unknown_chat_role(tiny_base, tmp_path):
    chat = [{"role": "user", "content": "describe the red fox ."}, {"role": "bot", "content": "the red fox is nice ."}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 4)
    proc, out = train("sft", tmp_path, data, tiny_base)
    assert_refused(proc, "sft", f"{data} row 1, field 'messages[1].role': unknown role 'bot'; expected one of "
                                "system, user, assistant", out)


def test_csv_wrong_field_count(tiny_base, tmp_path):
    data = tmp_path / "sft.csv"
    data.write_text("prompt,response\nhuman : hi . assistant :,hello .\nhuman : a, b . assistant :,ok .\n", encoding="utf-8")
    proc, out = train("sft", tmp_path, str(data), tiny_base)
    assert_refused(proc, "sft", f"{data} row 2: row has a different number of fields than the header: 3 instead of 2 "
                                "(prompt, response) (line 3)", out)


# ---- tokenizers: handled -------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_gets_a_distinct_pad(tiny_base, tmp_path):
    """No PAD at all (GPT-2 style) and no unused special token to take instead: a new `<|pad|>` is added, the embedding
    grows, and the saved folder keeps both. (The old PAD is renamed to an ordinary, non-special token: a special one
    would be taken as the PAD, tests/test_chat_checkpoints.py.)"""
    model = model_copy(tiny_base, tmp_path)

    def drop_pad(tok):
        pad = next(t for t in tok["added_tokens"] if t["content"] == "<|pad|>")
        pad["content"], pad["special"] = "<|spare|>", False
        tok["model"]["vocab"]["<|spare|>"] = tok["model"]["vocab"].pop("<|pad|>")

    edit_json(os.path.join(model, "tokenizer.json"), drop_pad)
    edit_json(os.path.join(model, "tokenizer_config.json"), lambda cfg: cfg.pop("pad_token"))
    assert saved_pad_and_eos(model)[0] is None
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    proc, out = train("sft", tmp_path, data, model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the tokenizer has no PAD token; PAD == EOS would mask the EOS" in proc.stderr
    assert "a distinct PAD '<|pad|>' (id 400) is used (a new token: the model's embedding grows by one row)" in proc.stderr
    pad, eos = saved_pad_and_eos(os.path.join(out, "model"))
    assert (pad, eos) == (400, 2)
    with open(os.path.join(out, "model", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["vocab_size"] == 401


def test_pad_equal_to_eos_gets_a_distinct_pad(tiny_base, tmp_path):
    model = model_copy(tiny_base, tmp_path)
    edit_json(os.path.join(model, "tokenizer_config.json"), lambda cfg: cfg.update(pad_token="<|eos|>"))
    assert saved_pad_and_eos(model) == (2, 2)
    data = write_jsonl(tmp_path / "prefs.jsonl", PREF_ROWS)
    proc, out = train("rm", tmp_path, data, model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the tokenizer uses its EOS '<|eos|>' as PAD; PAD == EOS would mask the EOS" in proc.stderr
    assert "a distinct PAD '<|pad|>' (id 0) is used (already in the vocabulary)" in proc.stderr
    assert saved_pad_and_eos(os.path.join(out, "model")) == (0, 2)


# ---- model folders -------------------------------------------------------------------------------------------------


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


BROKEN_FOLDERS = {
    "no_config": (lambda d: os.remove(os.path.join(d, "config.json")), "{d}: no config.json — not a Hugging Face model folder"),
    "no_weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")),
                   "{d}: no model weights (one of model.safetensors.index.json, model.safetensors"),
    "no_tokenizer": (lambda d: [os.remove(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json")],
                     "{d}: no tokenizer files (one of tokenizer.json"),
    "truncated_weights": (lambda d: _truncate(os.path.join(d, "model.safetensors")),
                          "{d}/model.safetensors: corrupt or truncated safetensors file: the tensors need"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_model_folder_missing_or_broken_files(tiny_base, tmp_path, case):
    model = model_copy(tiny_base, tmp_path)
    breaker, message = BROKEN_FOLDERS[case]
    breaker(model)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    proc, out = train("sft", tmp_path, data, model)
    assert_refused(proc, "sft", message.format(d=model), out)


@pytest.mark.parametrize("step, extra", [("sft", 3), ("rm", 100)])
def test_tokenizer_of_another_model(tiny_base, tmp_path, step, extra):
    """Token ids beyond the model's embedding (here tokens 400.. of a 400-row model) are refused, even a few."""
    model = model_copy(tiny_base, tmp_path)

    def add_tokens(tok):
        tok["added_tokens"] += [{"id": 400 + i, "content": f"<|extra_{i}|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True} for i in range(extra)]

    edit_json(os.path.join(model, "tokenizer.json"), add_tokens)
    data = write_jsonl(tmp_path / "data.jsonl", SFT_ROWS if step == "sft" else PREF_ROWS)
    proc, out = train(step, tmp_path, data, model)
    assert_refused(proc, step, f"{model}: vocabulary mismatch: the tokenizer ({model}) has {400 + extra} token ids but "
                               "the model's embedding has 400 rows (config.json vocab_size)", out)


# ---- generate / score ----------------------------------------------------------------------------------------------


def test_generate_malformed_prompts_file(tiny_base, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ['{"prompt": "human : hi . assistant :"}', '{"prompt": "oops"'])
    (tmp_path / "gen").mkdir()
    output = str(tmp_path / "gen" / "out.jsonl")
    proc = run_cli(["generate", tiny_base, prompts, "-o", output, "--max-new-tokens", "4"], check=False)
    assert_refused(proc, "generate", f"{prompts} row 2: malformed JSON on line 2: Expecting ',' delimiter", output_file=output)


def test_generate_from_folder_without_tokenizer(tiny_base, tmp_path):
    model = model_copy(tiny_base, tmp_path)
    BROKEN_FOLDERS["no_tokenizer"][0](model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "human : hi . assistant :"}])
    (tmp_path / "gen").mkdir()
    output = str(tmp_path / "gen" / "out.jsonl")
    proc = run_cli(["generate", model, prompts, "-o", output, "--max-new-tokens", "4"], check=False)
    assert_refused(proc, "generate", f"{model}: no tokenizer files", output_file=output)


def test_score_reward_model_missing_head_weights(tiny_base, tmp_path):
    """A reward-model folder with its normalisation but no head weights is refused, not given a random head."""
    model = model_copy(tiny_base, tmp_path)
    with open(os.path.join(model, "scalar_head.json"), "w", encoding="utf-8") as f:
        json.dump({"offset": 0.5, "gain": 1.0}, f)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "human : hi . assistant :", "response": " hello ."}])
    (tmp_path / "scores").mkdir()
    output = str(tmp_path / "scores" / "out.jsonl")
    proc = run_cli(["score", model, pairs, "-o", output], check=False)
    assert_refused(proc, "score", f"{model}: reward-model folder has scalar_head.json but no scalar_head.safetensors",
                   output_file=output)


def test_score_wrong_column_type(tiny_base, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "human : hi . assistant :", "response": " hello ."},
                                                   {"prompt": "human : hi . assistant :", "response": 7}])
    (tmp_path / "scores").mkdir()
    output = str(tmp_path / "scores" / "out.jsonl")
    proc = run_cli(["score", tiny_base, pairs, "-o", output], check=False)
    assert_refused(proc, "score", f"{pairs} row 2, field 'response': expected text, got int 7", output_file=output)


def test_weight_file_checks_without_loading(tiny_base, tmp_path):
    """In-process (no CLI): a missing shard of a sharded checkpoint, and safetensors headers that cannot be right."""
    from rlhf_ds.models.loading import ModelLoadError, check_model_dir

    model = model_copy(tiny_base, tmp_path)
    os.rename(os.path.join(model, "model.safetensors"), os.path.join(model, "model-00001-of-00002.safetensors"))
    with open(os.path.join(model, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(ModelLoadError) as err:
        check_model_dir(model)
    assert str(err.value) == (f"{model}: 1 of the 2 weight files listed in model.safetensors.index.json are missing: "
                              "model-00002-of-00002.safetensors")

    os.remove(os.path.join(model, "model.safetensors.index.json"))
    weights = os.path.join(model, "model.safetensors")
    bad_files = [(b"\xff" * 8, "its header claims"), (b"abc", "only 3 bytes"),
                 ((10).to_bytes(8, "little") + b"not json!!", "its header is not a valid")]
    for content, why in bad_files:
        with open(weights, "wb") as f:
            f.write(content)
        with pytest.raises(ModelLoadError, match=f"{weights}: corrupt or truncated safetensors file: {why}"):
            check_model_dir(model)


# ---- pretraining corpora --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"a fine document\n\nanother one\nwith \xe9 latin-1\n", "row 4: text is not valid UTF-8 (byte 0xe9)"),
    (b"", ": no text found (the file is empty)"),
])
def test_bad_text_corpus_refused_before_anything_is_written(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    out = str(tmp_path / "out")
    proc = run_cli(["pretrain", f"output_dir={out}", f"data.train={corpus}", "train.max_steps=1"], check=False)
    assert_refused(proc, "pretrain", f"{corpus}{'' if message.startswith(':') else ' '}{message}", out)


# ---- several sources in one run -------------------------------------------------------------------------------------


def test_reward_model_on_an_hh_file_plus_a_stack_exchange_file(tiny_base, tmp_path):
    """A list in data.train: each source with its own format (detected), template and limit; one log line per source
    with its kept/skipped counts; a held-out count carved from the mix (data.eval_split=4)."""
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": f"\n\nHuman: describe the {s} .\n\nAssistant: the {s} is nice .",
         "rejected": f"\n\nHuman: describe the {s} .\n\nAssistant:"} for s in SUBJECTS])  # an empty rejected answer
    stack = write_jsonl(tmp_path / "stack.jsonl", [
        {"question": f"what is the {s} ?", "response_j": f"the {s} is calm .", "response_k": f"{s} {s}"}
        for s in SUBJECTS] + [{"question": "", "response_j": "x", "response_k": "y"}])
    sources = f'[{hh}, {{path: {stack}, template: "Question: {{question}}\\n\\nAnswer:"}}]'  # YAML: \n is a newline
    out = str(tmp_path / "out")
    proc = run_cli(["rm", f"output_dir={out}", f"model={tiny_base}", f"data.train={sources}", "data.eval_split=4",
                    "data.on_bad_row=skip", *SHORT])
    assert f"source 1 of 2, {hh}: format 'dialogue': 8 rows, kept 8; weight 1 -> 8 examples" in proc.stderr
    assert (f"source 2 of 2, {stack}: format 'stack_exchange': 9 rows, kept 8, skipped 1 (empty text: 1); "
            "weight 1 -> 8 examples") in proc.stderr
    with open(os.path.join(out, "model", "scalar_head.json"), encoding="utf-8") as f:
        assert json.load(f)["prompt_templates"] == [None, "Question: {question}\n\nAnswer:"]  # for PPO to check


# ---- numbers and counts checked before any model loads (issue #22) ---------------------------------------------------
MODEL_LOADED = "parameters trainable"  # the steps' log line right after their model is built


def test_nonfinite_source_weight_refused_before_anything(tiny_base, tmp_path):
    """`weight: .nan` used to pass validation (NaN <= 0 is false) and crash with a traceback after the models loaded."""
    data = write_jsonl(tmp_path / "prefs.jsonl", PREF_ROWS)
    out = str(tmp_path / "out")
    for weight, shown in ((".nan", "nan"), (".inf", "inf")):
        proc = run_cli(["rm", f"output_dir={out}", f"model={tiny_base}", f"data.train=[{{path: {data}, weight: {weight}}}]",
                        *SHORT], check=False)
        assert_refused(proc, "rm", f"data.train[0].weight: {shown} is not a finite number", out)
        assert not os.path.exists(out)  # a config error: refused before the run directory exists
    proc = run_cli(["rm", f"output_dir={out}", f"model={tiny_base}", f"data.train=[{{path: {data}, weight: abc}}]"],
                   check=False)
    assert_refused(proc, "rm", "data.train[0].weight: expected a number, got 'abc'", out)


@pytest.mark.parametrize("step, n_rows, split, message", [
    # used to load the model, then fail with a traceback (ValueError, exit 1)
    ("sft", 8, 7, "data.eval_split=7 holds out 7 examples, but the training data has 8 examples and one global batch "
                  "(train.micro_batch_size 2 x 1 rank x train.grad_accum 1) needs 2 of them: set data.eval_split to "
                  "at most 6 (a count) or 0.75 (a fraction), or give the held-out set as data.eval"),
    # used to say "holds out 5000 of only 200 training examples; lower it", with no value that works
    ("rm", 200, 5000, "data.eval_split=5000 holds out 5000 pairs, but the training data has 200 pairs and one global "
                      "batch (train.micro_batch_size 2 x 1 rank x train.grad_accum 1) needs 2 of them: set "
                      "data.eval_split to at most 198 (a count) or 0.99 (a fraction), or give the held-out set as "
                      "data.eval"),
])
def test_eval_split_counted_before_any_model_loads(tiny_base, tmp_path, step, n_rows, split, message):
    rows = (SFT_ROWS if step == "sft" else PREF_ROWS) * (n_rows // len(SUBJECTS))
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = str(tmp_path / "out")
    proc = run_cli([step, f"output_dir={out}", f"model={tiny_base}", f"data.train={data}", f"data.eval_split={split}",
                    *SHORT], check=False)
    assert_refused(proc, step, message, out)
    assert MODEL_LOADED not in proc.stderr, proc.stderr[-3000:]  # refused before the model was built


@pytest.mark.parametrize("ranks", [1, 2])
def test_pretrain_eval_split_counted_before_the_model_is_built(tmp_path, ranks):
    """Pretraining holds out blocks, known once the tokenizer is trained: counted then, before the model is built and
    before `init/` is written; on 2 ranks both refuse (rank 0 counts, the others are told)."""
    docs = [f"the {s} is nice . it is {s} again ." for s in SUBJECTS] * 25  # 200 documents
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    out = str(tmp_path / "out")
    proc = run_cli(["pretrain", f"output_dir={out}", f"data.train={data}", "data.eval_split=5000", "data.max_seq_len=32",
                    "train.micro_batch_size=4", "arch.vocab_size=300", "arch.n_layers=1", "arch.hidden=32",
                    "arch.n_heads=2", "engine.zero_stage=0"], ranks=ranks, check=False)
    err = proc.stderr
    found = re.search(r"rlhf-ds pretrain: data\.eval_split=5000 holds out 5000 blocks, but the training data has (\d+) "
                      r"blocks and one global batch \(train\.micro_batch_size 4 x (\d) ranks? x train\.grad_accum 1\) "
                      r"needs (\d+) of them: set data\.eval_split to at most (\d+) \(a count\) or [0-9.]+ \(a "
                      r"fraction\), or give the held-out set as data\.eval \(the 200 documents pack into (\d+) blocks "
                      r"of 32 tokens; pretraining holds out blocks\)", err)
    assert found, err[-3000:]
    blocks, world, batch, most, packed = map(int, found.groups())
    assert (world, batch) == (ranks, 4 * ranks) and blocks == packed and most == blocks - batch and blocks > 20
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert sorted(set(os.listdir(out)) - {"logs", ".lock"}) == []  # no init/ (tokenizer + initial model)
    assert "held out); vocab" not in err  # pretrain's log line once the model is built and the blocks are split
