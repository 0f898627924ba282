"""Tokenization and collation with a tiny tokenizer built locally (no hub access)."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_ds.data.features import (
    collate_preferences,
    collate_sft,
    pad_batch,
    preference_features,
    prompt_features,
    render_prompt,
    sft_features,
)
from rlhf_ds.data.formats import PreferenceExample, PromptExample, SFTExample

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
CORPUS = [
    "Human : hi hello how are you",
    "Assistant : fine thanks good bad",
    "one two three four five six seven eight",
    "user assistant system be nice",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m.role }} : {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(bos=True):
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    extra = {"bos_token": "[BOS]"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]", **extra)


@pytest.fixture
def tok():
    return build_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- rendering ---------------------------------------------------------------------------


def test_render_plain_prompt_is_unchanged(tok):
    assert render_prompt(tok, SFTExample(prompt="hi", response="fine")) == "hi"


def test_render_messages_fallback_without_template(tok):
    chat = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine"},
    ]
    # For SFT the last assistant turn is the response, so it is left out of the prompt.
    expected = "be nice\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant:"
    assert render_prompt(tok, SFTExample(messages=chat)) == expected
    assert render_prompt(tok, PromptExample(messages=chat[:4])) == expected


def test_render_messages_with_chat_template(tok):
    tok.chat_template = TEMPLATE
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]
    assert render_prompt(tok, SFTExample(messages=chat)) == "[BOS]user : hi assistant :"


# ---- SFT features ------------------------------------------------------------------------


def test_sft_label_masking_bos_and_eos(tok):
    feats, report = sft_features([SFTExample("hi how are you", "fine thanks")], tok, 16, 32)
    prompt = [tok.bos_token_id] + ids(tok, "hi how are you")
    expected = prompt + ids(tok, "fine thanks") + [tok.eos_token_id]
    assert feats[0]["input_ids"] == expected
    assert feats[0]["labels"] == [-100] * len(prompt) + expected[len(prompt):]
    assert (report.truncated, report.dropped, report.response_truncated) == (0, 0, 0)


def test_sft_loss_on_prompt(tok):
    feats, _ = sft_features([SFTExample("hi", "fine")], tok, 8, 16, loss_on_prompt=True)
    assert feats[0]["labels"] == feats[0]["input_ids"]


def test_sft_messages_fallback_response_follows_assistant_marker(tok):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]
    feats, _ = sft_features([SFTExample(messages=chat)], tok, 16, 32)
    text = "\n\nHuman: hi\n\nAssistant:"
    assert feats[0]["input_ids"] == [tok.bos_token_id] + ids(tok, text) + ids(tok, " fine") + [tok.eos_token_id]


def test_bos_not_doubled_when_template_writes_it(tok):
    tok.chat_template = TEMPLATE
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]
    feats, _ = sft_features([SFTExample(messages=chat)], tok, 16, 32)
    seq = feats[0]["input_ids"]
    assert seq[0] == tok.bos_token_id and seq.count(tok.bos_token_id) == 1


def test_no_bos_when_tokenizer_has_none():
    tok = build_tokenizer(bos=False)
    feats, _ = sft_features([SFTExample("hi", "fine")], tok, 8, 16)
    assert feats[0]["input_ids"] == ids(tok, "hi") + ids(tok, "fine") + [tok.eos_token_id]


def test_long_prompt_left_truncated_keeping_bos(tok):
    feats, report = sft_features([SFTExample("one two three four five six", "fine")], tok, 4, 16)
    assert feats[0]["input_ids"][:4] == [tok.bos_token_id] + ids(tok, "four five six")
    assert feats[0]["labels"][:4] == [-100] * 4
    assert report.truncated == 1 and report.dropped == 0


def test_long_prompt_dropped_and_counted(tok):
    examples = [SFTExample("one two three four five six", "fine"), SFTExample("hi", "fine")]
    feats, report = sft_features(examples, tok, 4, 16, prompt_overflow="drop")
    assert len(feats) == 1 and report.dropped == 1 and report.examples == 2
    assert "1 dropped" in report.summary()


def test_sequence_cut_at_max_seq_len_loses_eos(tok):
    feats, report = sft_features([SFTExample("hi", "one two three four five")], tok, 4, 5)
    seq = feats[0]["input_ids"]
    assert seq == [tok.bos_token_id] + ids(tok, "hi") + ids(tok, "one two three")
    assert tok.eos_token_id not in seq and report.response_truncated == 1


def test_limit_validation(tok):
    with pytest.raises(ValueError, match="must exceed"):
        sft_features([], tok, 8, 8)
    with pytest.raises(ValueError, match="prompt_overflow"):
        sft_features([], tok, 4, 8, prompt_overflow="cut")
    with pytest.raises(ValueError, match="no room"):
        prompt_features([], tok, 1)


# ---- preference and prompt features ------------------------------------------------------


def test_preference_features_share_prompt(tok):
    ex = PreferenceExample("hi how are you", "fine thanks", "bad", margin=0.5, weight=0.25)
    feats, _ = preference_features([ex], tok, 16, 32)
    prompt = [tok.bos_token_id] + ids(tok, "hi how are you")
    f = feats[0]
    assert f["chosen_ids"] == prompt + ids(tok, "fine thanks") + [tok.eos_token_id]
    assert f["rejected_ids"] == prompt + ids(tok, "bad") + [tok.eos_token_id]
    assert (f["margin"], f["weight"], f["prompt_len"]) == (0.5, 0.25, len(prompt))


def test_preference_pair_identical_after_cut_is_dropped(tok):
    ex = PreferenceExample("hi", "one two three four", "one two three five")
    feats, report = preference_features([ex], tok, 2, 5)
    assert feats == [] and report.identical == 1 and report.response_truncated == 2


def test_prompt_features_truncate_and_drop(tok):
    chat = [{"role": "user", "content": "hi"}]
    examples = [PromptExample(prompt="one two three four five"), PromptExample(messages=chat)]
    seqs, report = prompt_features(examples, tok, 3)
    assert seqs[0] == [tok.bos_token_id] + ids(tok, "four five") and report.truncated == 2
    seqs, report = prompt_features(examples, tok, 3, prompt_overflow="drop")
    assert seqs == [] and report.dropped == 2


# ---- collation ---------------------------------------------------------------------------


def test_pad_batch_sides_and_pad_to():
    ids_r, mask_r = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids_r.tolist() == [[5, 6, 7], [8, 0, 0]] and mask_r.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids_l, mask_l = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left", pad_to=4)
    assert ids_l.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask_l.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert ids_l.dtype == mask_l.dtype == torch.long
    with pytest.raises(ValueError, match="shorter"):
        pad_batch([[1, 2, 3]], 0, pad_to=2)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_collate_sft_pads_labels_with_ignore_index():
    batch = collate_sft([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 4], "labels": [-100, 4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_preferences_stacks_chosen_then_rejected():
    feats = [
        {"chosen_ids": [1, 2], "rejected_ids": [1, 3, 3], "margin": 1.0, "weight": 0.5, "prompt_len": 1},
        {"chosen_ids": [1, 4, 4, 4], "rejected_ids": [1, 5], "margin": 0.0, "weight": 1.0, "prompt_len": 1},
    ]
    batch = collate_preferences(feats, pad_id=0)
    assert batch["input_ids"].shape == (4, 4)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 4, 4, 4], [1, 3, 3, 0], [1, 5, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 4, 3, 2]
    assert batch["margin"].tolist() == [1.0, 0.0] and batch["weight"].tolist() == [0.5, 1.0]
    assert batch["prompt_lens"].tolist() == [1, 1]


# ---- the tokenizer step 0 trains -----------------------------------------------------------------------------------


ROUND_TRIP = [
    "\n\nHuman: describe the fox\n\nAssistant: it runs .",
    "tabs\tand\t\ttabs, runs of   spaces,  trailing space ",
    "  leading spaces and\r\nwindows line ends\n",
    "non-ASCII: café, naïve, Größe, 漢字, emoji 🙂, ﬁ ligature, ½",
    "",
]


def test_trained_tokenizer_is_byte_level_and_round_trips(tmp_path):
    """Every text decodes back to itself after saving and loading (no unknown token exists, no normalisation, no
    space clean-up), and "Assistant:" after a newline is the same tokens as at the start of a text."""
    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.steps.pretrain import train_tokenizer

    corpus = ["human : describe the red fox . assistant : the fox is calm .", "the cat sleeps .\n\nthe dog runs ."] * 20
    train_tokenizer(corpus, 300).save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.unk_token is None
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, (text, tok.convert_ids_to_tokens(ids))
    assert tok.decode(tok(ROUND_TRIP[0])["input_ids"], skip_special_tokens=True) == ROUND_TRIP[0]
    marker = tok("Assistant:", add_special_tokens=False)["input_ids"]
    after_newline = tok("\n\nAssistant:", add_special_tokens=False)["input_ids"]
    assert after_newline[-len(marker):] == marker


def test_an_empty_answer_still_ends_with_eos(tok):
    pairs = [PreferenceExample(prompt="Human : hi", chosen=" fine thanks", rejected="")]
    feats, _ = preference_features(pairs, tok, max_prompt_tokens=8, max_seq_len=16)
    prompt = feats[0]["chosen_ids"][: feats[0]["prompt_len"]]
    assert feats[0]["rejected_ids"] == prompt + [tok.eos_token_id]


# ---- how a templated source's answers join their prompts (byte-level BPE, GPT-2 style) ----------------------------

HH_CHOSEN = "\n\nHuman: what is it?\n\nAssistant: it is a fox"
HH_REJECTED = "\n\nHuman: what is it?\n\nAssistant: is it"


def build_byte_level_bpe():
    """A tiny GPT-2-style tokenizer: byte-level pre-tokenization (a space joins the word after it: 'Ġit')."""
    from tokenizers import decoders

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([HH_CHOSEN, HH_REJECTED, "Question: how is it?\n\nAnswer: it is fine"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _hh_and_stack_exchange(tmp_path, template):
    from rlhf_ds.config import SourceConfig
    from rlhf_ds.data.formats import load_preferences

    hh, se = tmp_path / "hh.jsonl", tmp_path / "se.jsonl"
    hh.write_text(json.dumps({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}) + "\n", encoding="utf-8")
    se.write_text(json.dumps({"question": "what is it?", "response_j": "it is a fox", "response_k": "is it"}) + "\n",
                  encoding="utf-8")
    examples, _ = load_preferences([str(hh), SourceConfig(str(se), template=template)])
    return examples


def test_a_template_ending_in_response_tokenises_a_stack_exchange_answer_as_hh_does(tmp_path, caplog):
    """"...Assistant: {response}": the space starts the answer, so the join is ':' | 'Ġit' as in the HH dialogue, and
    the pair's token ids equal the HH pair's; the template without {response} gives ':' 'Ġ' | 'i' 't' and a warning."""
    tok = build_byte_level_bpe()
    tid = tok.convert_tokens_to_ids
    with caplog.at_level("WARNING", logger="rlhf_ds"):
        examples = _hh_and_stack_exchange(tmp_path, "\n\nHuman: {question}\n\nAssistant: {response}")
    assert not [r for r in caplog.records if "join prompt and response differently" in r.getMessage()]
    assert [(ex.prompt, ex.chosen, ex.rejected) for ex in examples] == \
        [("\n\nHuman: what is it?\n\nAssistant:", " it is a fox", " is it")] * 2
    feats, _ = preference_features(examples, tok, 32, 64)
    hh, se = feats
    assert se["chosen_ids"] == hh["chosen_ids"] and se["rejected_ids"] == hh["rejected_ids"]
    assert se["prompt_len"] == hh["prompt_len"] == 13  # <bos> + 12 prompt tokens
    n = se["prompt_len"]
    assert se["chosen_ids"][n - 2:] == [tid("Assistant"), tid(":"), tid("Ġit"), tid("Ġis"), tid("Ġa"), tid("Ġfox"),
                                        tok.eos_token_id]
    assert se["rejected_ids"][n - 1:] == [tid(":"), tid("Ġis"), tid("Ġit"), tok.eos_token_id]

    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf_ds"):
        old = _hh_and_stack_exchange(tmp_path, "\n\nHuman: {question}\n\nAssistant: ")
    warned = [r.getMessage() for r in caplog.records if "join prompt and response differently" in r.getMessage()]
    assert len(warned) == 1 and "hh.jsonl" in warned[0] and "se.jsonl" in warned[0] and "{response}" in warned[0]
    old_se = preference_features(old, tok, 32, 64)[0][1]
    n = old_se["prompt_len"]
    assert n == 14 and old_se["chosen_ids"][n - 2:n + 3] == [tid(":"), tid("Ġ"), tid("i"), tid("t"), tid("Ġis")]
    assert old_se["chosen_ids"] != hh["chosen_ids"]


def test_a_response_template_gives_sft_targets_and_ppo_prompts_the_same_join(tmp_path):
    """SFT: the target starts with 'Ġit' (label positions); PPO/eval prompts end at ':' (the model generates the
    space, as it learned)."""
    from rlhf_ds.data.formats import load_prompts, load_sft

    tok = build_byte_level_bpe()
    tid = tok.convert_tokens_to_ids
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "what is it?", "response": "it is a fox"}) + "\n", encoding="utf-8")
    template = "\n\nHuman: {prompt}\n\nAssistant: {response}"
    feats, _ = sft_features(load_sft(str(path), template=template)[0], tok, 32, 64)
    (hh,), _ = preference_features([PreferenceExample("\n\nHuman: what is it?\n\nAssistant:", " it is a fox", " no")],
                                   tok, 32, 64)
    assert feats[0]["input_ids"] == hh["chosen_ids"]
    targets = [t for t in feats[0]["labels"] if t != -100]
    assert targets == [tid("Ġit"), tid("Ġis"), tid("Ġa"), tid("Ġfox"), tok.eos_token_id]
    prompts, _ = prompt_features(load_prompts(str(path), template=template)[0], tok, 32)
    assert prompts[0] == hh["chosen_ids"][:hh["prompt_len"]] and prompts[0][-1] == tid(":")
