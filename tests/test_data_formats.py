"""Readers and format parsing: every supported layout, detection, remapping and error messages."""

import json
import re

import pytest

from rlhf_ds.data.formats import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preferences,
    load_prompts,
    load_sft,
    parse_preferences,
    parse_prompts,
    parse_sft,
)
from rlhf_ds.data.readers import DataError, Record, read_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def records(rows, file="data/train.jsonl"):
    return [Record(file, i, row) for i, row in enumerate(rows, start=1)]


def assert_names(err, file, row, field):
    text = str(err.value)
    assert err.value.file == file and err.value.row == row and err.value.field == field
    assert file in text and f"row {row}" in text and repr(field) in text


# ---- readers -----------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_keeps_line_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n', encoding="utf-8")
    got = read_records(str(path))
    assert [(r.row, r.data["prompt"]) for r in got] == [(1, "a"), (4, "b")]
    assert got[0].file == str(path)


def test_jsonl_malformed_line_names_file_line_and_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(str(path))
    assert err.value.file == str(path) and err.value.row == 2
    assert "line 2" in str(err.value) and "malformed JSON" in str(err.value)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON object, got list") as err:
        read_records(str(path))
    assert err.value.row == 2


def test_non_utf8_bytes_name_file_row_and_field(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        read_records(str(path))
    assert_names(err, str(path), 2, "prompt")
    assert "0xe9" in str(err.value)


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,response\nhi,there\nx,caf\xe9\n")
    with pytest.raises(DataError, match="UTF-8") as err:
        read_records(str(path))
    assert_names(err, str(path), 2, "response")


def test_json_list_and_json_lines_fallback(tmp_path):
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]), encoding="utf-8")
    lines = write_jsonl(tmp_path / "b.json", [{"prompt": "c"}, {"prompt": "d"}])
    assert [r.data["prompt"] for r in read_records(str(listed))] == ["a", "b"]
    assert [r.data["prompt"] for r in read_records(str(lines))] == ["c", "d"]


def test_json_errors_point_at_the_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON on line 3"):
        read_records(str(broken))
    columnar = tmp_path / "columnar.json"
    columnar.write_text('{\n  "prompt": ["a", "b"]\n}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a list of objects or one object per line, got a JSON dict"):
        read_records(str(columnar))


def test_data_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(DataError("empty text", "f.jsonl", 3, "chosen")))
    assert (err.file, err.row, err.field, str(err)) == ("f.jsonl", 3, "chosen", "f.jsonl row 3, field 'chosen': empty text")


def test_csv_round_trip_with_utf8_bom(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("\ufeffprompt,response\n\"hi, you\",there\n", encoding="utf-8")
    examples, _ = load_sft(str(path))
    assert examples == [SFTExample(prompt="hi, you", response="there")]


def test_csv_ragged_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,response\nhi\n", encoding="utf-8")
    with pytest.raises(DataError, match="number of fields") as err:
        read_records(str(path))
    assert err.value.row == 1


def test_parquet_round_trip(tmp_path):
    import pandas as pd

    path = tmp_path / "train.parquet"
    pd.DataFrame({"prompt": ["p"], "chosen": ["good"], "rejected": ["bad"], "margin": [1.5]}).to_parquet(path)
    examples, report = load_preferences(str(path))
    assert examples == [PreferenceExample("p", "good", "bad", margin=1.5, group=0)]
    assert report.fmt == "prompt_chosen_rejected"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    single.save_to_disk(str(tmp_path / "single"))
    both = datasets.DatasetDict({"train": single, "test": datasets.Dataset.from_list([{"prompt": "t", "completion": "u"}])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert load_sft(str(tmp_path / "single"))[0] == [SFTExample("a", "b")]
    assert load_sft(str(tmp_path / "dict"), split="test")[0] == [SFTExample("t", "u")]
    with pytest.raises(DataError, match="split 'validation' not found; available splits: train, test"):
        read_records(str(tmp_path / "dict"), split="validation")


def test_folder_of_files_and_split_tags(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "part1.jsonl", [{"prompt": "a"}])
    write_jsonl(plain / "part2.jsonl", [{"prompt": "b"}])
    assert [e.prompt for e in load_prompts(str(plain))[0]] == ["a", "b"]

    tagged = tmp_path / "tagged"
    tagged.mkdir()
    write_jsonl(tagged / "train.jsonl", [{"prompt": "tr"}])
    write_jsonl(tagged / "test-00000.jsonl", [{"prompt": "te"}])
    assert [e.prompt for e in load_prompts(str(tagged), split="test")[0]] == ["te"]
    with pytest.raises(DataError, match="no files for split 'eval'"):
        read_records(str(tagged), split="eval")


def test_missing_file_path(tmp_path):
    for source in ("data/nope.jsonl", str(tmp_path / "a" / "b" / "c")):
        with pytest.raises(DataError, match="file not found") as err:
            read_records(source)
        assert err.value.file == source


def test_unsupported_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_records(str(path))


def test_hub_name_offline_fails_clearly(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        read_records("no-such-owner/no-such-dataset")
    text = str(err.value)
    assert "neither a local path nor a dataset reachable on the hub" in text
    assert "HF_DATASETS_OFFLINE" in text and err.value.file == "no-such-owner/no-such-dataset"


def test_load_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows found"):
        load_sft(str(path))


# ---- SFT ---------------------------------------------------------------------------------


def test_sft_prompt_response_and_completion_detected():
    assert parse_sft(records([{"prompt": "p", "response": "r"}]))[0] == [SFTExample("p", "r")]
    examples, report = parse_sft(records([{"prompt": "p", "completion": "c"}]))
    assert examples == [SFTExample("p", "c")] and report.fmt == "prompt_completion"


def test_sft_messages():
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    examples, report = parse_sft(records([{"messages": chat}]))
    assert report.fmt == "messages" and examples[0].messages == chat


def test_sft_messages_from_csv_json_string(tmp_path):
    path = tmp_path / "chat.csv"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cell = json.dumps(chat).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert load_sft(str(path))[0][0].messages == chat


def test_sft_unknown_role():
    chat = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]
    with pytest.raises(DataError, match="unknown role 'bot'") as err:
        parse_sft(records([{"messages": chat}]))
    assert_names(err, "data/train.jsonl", 1, "messages[1].role")


def test_sft_messages_must_end_with_assistant():
    with pytest.raises(DataError, match="last turn must be from the assistant"):
        parse_sft(records([{"messages": [{"role": "user", "content": "hi"}]}]))


def test_sft_column_remapping():
    rows = [{"instruction": "do it", "output": "done"}]
    examples, _ = parse_sft(records(rows), columns={"prompt": "instruction", "response": "output"})
    assert examples == [SFTExample("do it", "done")]


def test_explicit_format_and_unknown_format():
    rows = [{"prompt": "p", "response": "r", "completion": "c"}]
    assert parse_sft(records(rows), fmt="prompt_completion")[0] == [SFTExample("p", "c")]
    with pytest.raises(ValueError, match="unknown SFT format 'alpaca'"):
        parse_sft(records(rows), fmt="alpaca")


def test_undetectable_columns_lists_what_was_found():
    with pytest.raises(DataError, match=r"cannot tell the SFT format from columns \[input, output\]") as err:
        parse_sft(records([{"input": "a", "output": "b"}]))
    assert "columns=" in str(err.value)


def test_plain_dicts_are_accepted():
    assert parse_prompts([{"prompt": "hello"}])[0] == [PromptExample(prompt="hello")]


# ---- bad rows ----------------------------------------------------------------------------

BAD_ROWS = [
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing field"),
    ({"prompt": "   ", "chosen": "c", "rejected": "r"}, "prompt", "empty text"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "non-string value"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "chosen identical to rejected"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin", "invalid margin"),
]


@pytest.mark.parametrize("row, field, reason", BAD_ROWS)
def test_bad_row_error_names_file_row_field(row, field, reason):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(DataError) as err:
        parse_preferences(records([good, good, row]), fmt="prompt_chosen_rejected")
    assert_names(err, "data/train.jsonl", 3, field)


def test_bad_row_message_format():
    with pytest.raises(DataError) as err:
        parse_preferences(records([{"prompt": "", "chosen": "c", "rejected": "r"}]))
    assert str(err.value) == "data/train.jsonl row 1, field 'prompt': empty text"


def test_missing_field_lists_present_columns():
    with pytest.raises(DataError, match=r"missing field \(columns present: prompt\)"):
        parse_sft(records([{"prompt": "p", "response": "r"}, {"prompt": "p"}]))


def test_skip_mode_counts_each_reason():
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    rows = [good] + [row for row, _, _ in BAD_ROWS] + [dict(good, chosen="", rejected=" ")]
    examples, report = parse_preferences(records(rows), on_bad_row="skip")
    assert len(examples) == 1 and report.total == 7 and report.kept == 1
    assert report.skipped == {
        "missing field": 1, "empty text": 2, "non-string value": 1, "chosen identical to rejected": 1, "invalid margin": 1,
    }
    assert "kept 1, skipped 6" in report.summary() and "empty text: 2" in report.summary()


def test_invalid_on_bad_row_value():
    with pytest.raises(ValueError, match="on_bad_row"):
        parse_prompts(records([{"prompt": "p"}]), on_bad_row="ignore")


# ---- preferences -------------------------------------------------------------------------


def test_preference_margin_column():
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2}, {"prompt": "p", "chosen": "c", "rejected": "r"}]
    examples, _ = parse_preferences(records(rows))
    assert [e.margin for e in examples] == [2.0, 0.0]


def test_full_dialogue_prefix_split():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    row = {"chosen": shared + " Fine, thanks.", "rejected": shared + " Fine. Go away."}
    examples, report = parse_preferences(records([row]))
    assert report.fmt == "dialogue"
    assert examples == [PreferenceExample(shared, " Fine, thanks.", " Fine. Go away.", group=0)]


def test_full_dialogue_without_common_assistant_prefix():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}
    with pytest.raises(DataError, match="share no prefix") as err:
        parse_preferences(records([row]))
    assert_names(err, "data/train.jsonl", 1, "rejected")


def test_stack_exchange_paired_j_preferred():
    row = {"question": "q?", "response_j": "good", "response_k": "bad"}
    examples, report = parse_preferences(records([row]))
    assert report.fmt == "stack_exchange" and examples == [PreferenceExample("q?", "good", "bad")]


def test_ranked_list_expansion_weights():
    rows = [{"prompt": "p", "responses": ["a", "b", "c"]}, {"prompt": "q", "responses": ["x", "y"]}]
    examples, report = parse_preferences(records(rows))
    assert report.fmt == "ranked" and report.kept == 2
    assert [(e.chosen, e.rejected) for e in examples[:3]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [e.weight for e in examples[:3]] == pytest.approx([1 / 3] * 3)
    assert [e.group for e in examples] == [0, 0, 0, 1]
    for group in (0, 1):
        assert sum(e.weight for e in examples if e.group == group) == pytest.approx(1.0)


def test_ranked_list_bad_entries():
    with pytest.raises(DataError, match="at least 2"):
        parse_preferences(records([{"prompt": "p", "responses": ["a"]}]))
    with pytest.raises(DataError) as err:
        parse_preferences(records([{"prompt": "p", "responses": ["a", 5]}]))
    assert_names(err, "data/train.jsonl", 1, "responses[1]")


def test_preference_column_remapping():
    row = {"instruction": "p", "better": "c", "worse": "r"}
    examples, _ = parse_preferences(records([row]), columns={"prompt": "instruction", "chosen": "better", "rejected": "worse"})
    assert examples == [PreferenceExample("p", "c", "r")]


# ---- prompts -----------------------------------------------------------------------------


def test_prompt_formats():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert parse_prompts(records([{"messages": chat}]))[0] == [PromptExample(messages=chat)]
    assert parse_prompts(records([{"question": "why?"}]))[0] == [PromptExample(prompt="why?")]
    # Preference data doubles as a prompt source through its prompt column.
    assert parse_prompts(records([{"prompt": "p", "chosen": "c", "rejected": "r"}]))[1].fmt == "prompt"


def test_prompt_messages_must_end_with_user():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match="last turn must be from the user") as err:
        parse_prompts(records([{"messages": chat}]))
    assert_names(err, "data/train.jsonl", 1, "messages[1].role")


# ---- hostile values ----------------------------------------------------------------------


def test_huge_text_is_refused_before_tokenizing(monkeypatch):
    from rlhf_ds.data import formats

    monkeypatch.setattr(formats, "MAX_TEXT_CHARS", 10)
    good = {"prompt": "p", "response": "r" * 10}
    with pytest.raises(DataError) as err:
        parse_sft(records([good, {"prompt": "p", "response": "r" * 11}]))
    assert_names(err, "data/train.jsonl", 2, "response")
    assert "text of 11 characters exceeds the 10-character limit" in str(err.value)
    examples, report = parse_sft(records([good, {"prompt": "x" * 12, "response": "r"}]), on_bad_row="skip")
    assert examples == [SFTExample("p", "r" * 10)] and report.skipped == {"text too long": 1}


def test_huge_text_limit_is_a_million_characters():
    from rlhf_ds.data.formats import MAX_TEXT_CHARS

    assert MAX_TEXT_CHARS == 1_000_000
    with pytest.raises(DataError, match="text of 1,000,001 characters exceeds the 1,000,000-character limit") as err:
        parse_prompts(records([{"messages": [{"role": "user", "content": "a" * 1_000_001}]}]))
    assert_names(err, "data/train.jsonl", 1, "messages[0].content")


@pytest.mark.parametrize("value, shown", [
    (42, "got int 42"), (["a", "b"], "got list ['a', 'b']"), ({"text": "a"}, "got dict {'text': 'a'}"),
    (True, "got bool True"), (list(range(1000)), "got list of 1000 items"), ("x" * 100, None),
])
def test_wrong_column_type_names_the_type(value, shown):
    row = {"prompt": "p", "chosen": value, "rejected": "r"}
    if shown is None:  # a long string is fine
        assert parse_preferences(records([row]))[0][0].chosen == value
        return
    with pytest.raises(DataError) as err:
        parse_preferences(records([row]))
    assert_names(err, "data/train.jsonl", 1, "chosen")
    assert str(err.value).endswith(f"expected text, {shown}")


def test_whitespace_only_text_says_so():
    with pytest.raises(DataError) as err:
        parse_sft(records([{"prompt": "p", "response": " \n\t "}]))
    assert str(err.value) == "data/train.jsonl row 1, field 'response': empty text (only whitespace)"


def test_csv_ragged_row_counts_fields_and_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,response\n"multi\nline",ok\na,b,c\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(str(path))
    assert str(err.value) == (f"{path} row 2: row has a different number of fields than the header: 3 instead of 2 "
                              "(prompt, response) (line 4); quote fields that contain commas")


# ---- empty answers in preference pairs -------------------------------------------------------------------------------


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "p", "chosen": "a fine answer", "rejected": ""}, "prompt_chosen_rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "a rude answer"}, "prompt_chosen_rejected"),
    ({"question": "p", "response_j": "a fine answer", "response_k": ""}, "stack_exchange"),
    ({"chosen": "\n\nHuman: p\n\nAssistant: a fine answer", "rejected": "\n\nHuman: p\n\nAssistant:"}, "dialogue"),
    ({"prompt": "p", "responses": ["a fine answer", "", "meh"]}, "ranked"),
])
def test_an_empty_answer_is_a_real_answer(row, fmt):
    examples, report = parse_preferences(records([row]))
    assert report.fmt == fmt and report.kept == 1
    assert any(ex.chosen == "" or ex.rejected == "" for ex in examples)


@pytest.mark.parametrize("row, field, detail", [
    ({"prompt": "p", "chosen": "", "rejected": "  "}, "rejected", "both 'chosen' and 'rejected' are empty"),
    ({"prompt": "", "chosen": "c", "rejected": ""}, "prompt", "empty text"),
    ({"prompt": "p", "responses": ["", "x", ""]}, "responses[2]", "both 'responses[0]' and 'responses[2]' are empty"),
])
def test_empty_prompt_or_both_answers_empty_stay_errors(row, field, detail):
    with pytest.raises(DataError) as err:
        parse_preferences(records([row]))
    assert str(err.value) == f"data/train.jsonl row 1, field '{field}': {detail}"


def test_empty_sft_target_stays_an_error():
    with pytest.raises(DataError, match="field 'response': empty text"):
        parse_sft(records([{"prompt": "p", "response": ""}]))


# ---- several sources, templates, weights ------------------------------------------------------------------------

HH = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: bad {i}"}
      for i in range(4)]
SE = [{"question": f"how {i}?", "response_j": f"like this {i}", "response_k": f"no {i}"} for i in range(6)]
STACK_TEMPLATE = "Question: {question}\n\nAnswer: "


def test_a_folder_mixing_formats_detects_the_format_per_file(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "hh.jsonl", HH)
    write_jsonl(folder / "stack.jsonl", SE)
    examples, report = load_preferences(str(folder))
    assert report.fmt == "dialogue, stack_exchange" and report.kept == 10 and len(examples) == 10
    assert examples[0].prompt == "\n\nHuman: q0?\n\nAssistant:" and examples[4].prompt == "how 0?"


def test_a_list_of_sources_each_with_its_format_columns_template_limit_and_weight(tmp_path, caplog):
    from rlhf_ds.config import SourceConfig

    hh = write_jsonl(tmp_path / "hh.jsonl", HH)
    renamed = write_jsonl(tmp_path / "se.jsonl", [{"q": r["question"], "good": r["response_j"], "bad": r["response_k"]}
                                                  for r in SE])
    se = SourceConfig(str(renamed), format="stack_exchange", template=STACK_TEMPLATE, limit=4, weight=0.5,
                      columns={"question": "q", "response_j": "good", "response_k": "bad"})
    with caplog.at_level("INFO", logger="rlhf_ds"):
        examples, report = load_preferences([str(hh), se], seed=3)
    assert len(examples) == 4 + 2  # all 4 HH rows; half of the first 4 stack-exchange rows
    assert report.fmt == "dialogue, stack_exchange" and report.total == 8 and report.kept == 8
    assert [ex.prompt for ex in examples[:4]] == [r["chosen"].split(" good")[0] for r in HH]
    stack = examples[4:]
    assert all(ex.prompt.startswith("Question: how ") and ex.prompt.endswith("?\n\nAnswer: ") for ex in stack)
    assert len({ex.group for ex in examples}) == 6  # rows of different sources never share a group
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source ")]
    assert lines[0].startswith(f"source 1 of 2, {hh}: format 'dialogue': 4 rows, kept 4; weight 1 -> 4 examples")
    assert lines[1].startswith(f"source 2 of 2, {renamed}: format 'stack_exchange': 4 rows, kept 4; weight 0.5 -> 2")


def test_source_weights_resample_with_a_seed():
    from rlhf_ds.data.formats import resample

    items = list(range(10))
    half = resample(items, 0.5, seed=1)
    assert len(half) == 5 and set(half) < set(items) and half == resample(items, 0.5, seed=1)
    assert half != resample(items, 0.5, seed=2)
    more = resample(items, 2.3, seed=1)
    assert len(more) == 23 and all(more.count(i) >= 2 for i in items)
    assert resample(items, 1.0, seed=1) is items


def test_a_template_renders_prompts_of_every_prompt_format(tmp_path):
    se = write_jsonl(tmp_path / "se.jsonl", SE[:1])
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "how 0?", "response": "x"}])
    expected = "Question: how 0?\n\nAnswer: "
    assert load_preferences(str(se), template=STACK_TEMPLATE)[0][0].prompt == expected
    assert load_sft(str(plain), template="Question: {prompt}\n\nAnswer: ")[0][0].prompt == expected
    assert load_prompts(str(plain), template=STACK_TEMPLATE)[0][0].prompt == expected
    assert load_prompts(str(plain), template="{{literal}} {prompt}")[0][0].prompt == "{literal} how 0?"


@pytest.mark.parametrize("template, detail", [
    ("Q: {query}", "unknown: 'query'"),
    ("no placeholder", "must contain {prompt}"),
    ("Q: {prompt", "invalid template"),
])
def test_a_bad_template_is_refused_naming_the_source(tmp_path, template, detail):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError, match=re.escape(detail)) as err:
        load_prompts(str(path), template=template)
    assert err.value.file == str(path) and err.value.field == "template"


def test_a_template_is_refused_for_chat_rows(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="chat \\(messages\\) rows are rendered with the tokenizer's chat template"):
        load_prompts(str(path), template="Q: {prompt}")


# ---- plain-text corpora -----------------------------------------------------------------------------------------


def test_text_corpus_one_document_per_blank_line_block_or_per_line(tmp_path):
    from rlhf_ds.data.corpus import read_corpus

    path = tmp_path / "corpus.txt"
    path.write_bytes("first doc line one\nline two\n\n\n  \nsecond: tab\there\r\n\nthird é\n".encode("utf-8"))
    assert read_corpus(str(path)) == ["first doc line one\nline two", "second: tab\there", "third é"]
    assert read_corpus(str(path), "line") == ["first doc line one", "line two", "second: tab\there", "third é"]


def test_text_corpus_errors_name_file_and_line(tmp_path):
    from rlhf_ds.data.corpus import read_corpus

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\nstill fine\nbroken \xff byte\n")
    with pytest.raises(DataError) as err:
        read_corpus(str(bad))
    assert str(err.value) == f"{bad} row 4: text is not valid UTF-8 (byte 0xff); re-save the file as UTF-8"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\n  \n")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no text found (the file is empty)")):
        read_corpus(str(empty))


# ---- one numbering: rows count from 1 in every reader (issue #22) -------------------------------------------------------


def test_rows_count_from_one_and_a_jsonl_row_is_its_line(tmp_path):
    """Line 30 of a JSONL file is row 30 in every message (was: "row 29 ... line 30"); a bad field in a row found by
    the format is named with the same number."""
    good = json.dumps({"prompt": "p", "response": "r"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([good] * 29 + ['{"prompt": "p", "response": ', good]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(str(broken))
    assert str(err.value) == f"{broken} row 30: malformed JSON on line 30: Expecting value (column 29)"
    typed = tmp_path / "typed.jsonl"
    typed.write_text("\n".join([good] * 20 + [""] * 2 + [good] * 7 + ['{"prompt": "p", "response": 7}']) + "\n",
                     encoding="utf-8")  # two blank lines count as lines
    with pytest.raises(DataError) as err:
        load_sft(str(typed))
    assert str(err.value) == f"{typed} row 30, field 'response': expected text, got int 7"


def test_rows_count_from_one_in_csv_json_parquet_and_saved_datasets(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"prompt": "p", "response": "r"}] * 4 + [{"prompt": "p", "response": ""}]  # the 5th row is bad
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("prompt,response\n" + "p,r\n" * 4 + "p,\n", encoding="utf-8")
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    parquet_file = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(parquet_file)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for source in (csv_file, json_file, parquet_file, saved):
        with pytest.raises(DataError) as err:
            load_sft(str(source))
        assert str(err.value) == f"{source} row 5, field 'response': empty text"
    # plain dicts (no file) count the same way
    with pytest.raises(DataError) as err:
        parse_sft(rows)
    assert str(err.value) == "<records> row 5, field 'response': empty text"


def test_a_template_may_end_with_response_which_moves_its_whitespace_to_the_responses(tmp_path):
    from rlhf_ds.data.formats import render_template, split_template

    assert split_template("\n\nHuman: {prompt}\n\nAssistant: {response}") == ("\n\nHuman: {prompt}\n\nAssistant:", " ")
    assert split_template("Q: {prompt}\nA:\n {response}") == ("Q: {prompt}\nA:", "\n ")
    assert split_template("Q: {prompt}\nA:{response}") == ("Q: {prompt}\nA:", "")
    assert split_template(STACK_TEMPLATE) == (STACK_TEMPLATE, "")  # without {response}: as before
    assert split_template("Q: {prompt} {{response}}") == ("Q: {prompt} {{response}}", "")  # literal braces
    assert render_template("Question: {question}\n\nAnswer: {response}", "how?") == "Question: how?\n\nAnswer:"
    se = write_jsonl(tmp_path / "se.jsonl", [{"question": "how 0?", "response_j": "like this", "response_k": ""}])
    (pair,), _ = load_preferences(str(se), template="Question: {question}\n\nAnswer: {response}")
    # the rendered text is the template's; an empty answer stays empty ([BOS] + prompt + [EOS])
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Question: how 0?\n\nAnswer:", " like this", "")
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "how 0?", "response": "x", "answer": "4"}])
    (sft,), _ = load_sft(str(plain), template="Q: {prompt}\nA: {response}")
    assert (sft.prompt, sft.response) == ("Q: how 0?\nA:", " x")
    (prompt,), _ = load_prompts(str(plain), template="Q: {prompt}\nA: {response}")
    assert prompt.prompt == "Q: how 0?\nA:" and prompt.columns == {"response": "x", "answer": "4"}


@pytest.mark.parametrize("template", ["Q: {response} {prompt}", "Q: {prompt} {response}{response}",
                                      "Q: {prompt} {response:>4}", "A: {response}"])
def test_response_must_end_a_template_once(tmp_path, template):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError) as err:
        load_prompts(str(path), template=template)
    assert err.value.file == str(path) and err.value.field == "template"
    assert ("may only be its very end, once" if "{prompt}" in template else "must contain {prompt}") in str(err.value)


def test_a_template_that_glues_answers_to_the_prompt_warns(tmp_path, caplog):
    from rlhf_ds.data.formats import check_joins, join_kind

    assert [join_kind(p, r) for p, r in (("A: ", "it"), ("A:", " it"), ("A: ", " it"), ("A:", "it"))] == \
        ["prompt", "response", "both", "none"]
    se = write_jsonl(tmp_path / "se.jsonl", SE)
    with caplog.at_level("WARNING", logger="rlhf_ds"):
        load_preferences(str(se), template="Question: {question}\n\nAnswer:")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{se}: template 'Question: {{question}}\\n\\nAnswer:' joins prompt and response without "
                              "whitespace ('...ow 0?\\n\\nAnswer:' + 'like this ...' renders '?\\n\\nAnswer:like this ')")
    assert "' {response}'" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf_ds"):  # the same join everywhere, or no template: nothing to say
        load_preferences(str(se), template="Question: {question}\n\nAnswer: {response}")
        load_preferences([str(se), str(se)])
    assert not caplog.records
    assert check_joins([("a", None, ("response", "A:", " x")), ("b", "T {prompt}", None)]) is None
