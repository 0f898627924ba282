"""Chat checkpoints whose tokenizer has PAD == EOS, or no PAD at all, through every step on 2 CPU ranks under ZeRO-3
(the default engines), from the tiny LLaMA-family ChatML models of `tests/chat_models.py`:

* `pad_is_eos` (PAD == EOS `<|im_end|>`, unused special `<|endoftext|>` at id 0): the unused special token becomes the
  PAD; nothing grows: every saved model (SFT, RM, DPO, PPO actor and critic) keeps the base's vocab_size and rows;
* `no_pad` (no PAD, no spare special token, untied embeddings): a new `<|pad|>` is added and the input and output
  embeddings grow by exactly one row, under ZeRO-3, for causal LMs (SFT, DPO's policy and reference, PPO's actor and
  reference) and scalar-head models (RM); the grown folders reload (PPO's reward model and critic are the saved RM,
  loaded under ZeRO-3; plain transformers loads the SFT folder).

Each kind runs SFT, RM, DPO and PPO (GAE: actor, reference, critic, reward model) two steps each. What loading did to
the weights is read from one more SFT step per kind (and for `no_pad_tied`) at a learning rate of 1e-30, which leaves
every fp32 weight as loaded: the base's rows exactly, plus for a grown model one new row equal to the mean of the
base's rows, in both layers (untied) or in the one shared weight (tied). All eleven runs go in one launch
(`conftest.run_cli_many`: the real CLI, `rlhf_ds.cli.main`, for each command in turn, in one process group, as PPO's
four engines).
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import read_metrics, run_cli_many

KINDS = ("pad_is_eos", "no_pad")
STILL_KINDS = ("pad_is_eos", "no_pad", "no_pad_tied")  # one SFT step at lr 1e-30 each: the weights as loaded
BASE_VOCAB = 300  # chat_models.VOCAB: both tokenizers have exactly this many tokens
STEP_KEYS = {"sft": "sft/loss", "rm": "rm/loss", "dpo": "dpo/loss", "ppo": "ppo/kl"}
SMALL = ["data.eval_split=0", "data.max_prompt_tokens=48", "data.max_seq_len=96", "train.log_every=1",
         "checkpoint.every_minutes=0"]
TRAIN = [*SMALL, "train.max_steps=2", "train.micro_batch_size=2"]
PPO = [*SMALL, "ppo.steps=2", "ppo.rollout_batch_size=2", "ppo.micro_batch_size=2", "ppo.ppo_epochs=1",
       "ppo.advantage_estimator=gae", "generation.max_new_tokens=8"]


def commands(base: str, data: dict[str, str], out: str) -> dict[str, list[str]]:
    """The four steps from `base`: PPO's actor (and reference) is the base itself, its reward model (and critic) the
    RM this launch saves."""
    return {
        "sft": ["sft", f"model={base}", f"data.train={data['sft']}", *TRAIN],
        "rm": ["rm", f"model={base}", f"data.train={data['prefs']}", *TRAIN],
        "dpo": ["dpo", f"model={base}", f"data.train={data['prefs']}", *TRAIN],
        "ppo": ["ppo", f"actor.model={base}", f"reward.model={os.path.join(out, 'rm')}",
                f"data.train={data['prompts']}", *PPO],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, str]]:
    """{kind: {"base": folder, step: run dir}}, all eight runs in one 2-rank launch."""
    from chat_models import build_chat_model, write_chat_data

    root = tmp_path_factory.mktemp("chat_checkpoints")
    data = write_chat_data(str(root / "data"))
    out: dict[str, dict[str, str]] = {}
    runs: list[list[str]] = []
    for kind in STILL_KINDS:
        base = build_chat_model(str(root / f"base_{kind}"), kind)
        run_root = str(root / kind)
        out[kind] = {"base": base}
        steps = commands(base, data, run_root) if kind in KINDS else {}
        steps["still"] = ["sft", f"model={base}", f"data.train={data['sft']}", *SMALL, "train.max_steps=1",
                          "train.micro_batch_size=2", "engine.lr=1e-30"]
        for step, args in steps.items():
            out[kind][step] = os.path.join(run_root, step)
            runs.append([*args, f"output_dir={out[kind][step]}"])
    run_cli_many(runs, ranks=2, timeout=400)
    return out


# ---- reading saved folders ----------------------------------------------------------------------------------------


def saved_folders(run: dict[str, str]) -> dict[str, str]:
    """Every model folder the four steps saved."""
    return {"sft": os.path.join(run["sft"], "model"), "rm": os.path.join(run["rm"], "model"),
            "dpo": os.path.join(run["dpo"], "model"), "ppo_actor": os.path.join(run["ppo"], "model"),
            "ppo_critic": os.path.join(run["ppo"], "critic")}


def config_vocab(folder: str) -> int:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)["vocab_size"]


def vocab_rows(folder: str) -> dict[str, int]:
    """Rows of the input embedding ("embed") and, when saved apart from it, the output layer ("lm_head")."""
    from safetensors import safe_open

    rows = {}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith("embed_tokens.weight"):
                rows["embed"] = f.get_slice(key).get_shape()[0]
            elif key.endswith("lm_head.weight"):
                rows["lm_head"] = f.get_slice(key).get_shape()[0]
    return rows


def saved_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def rank0_log(run_dir: str) -> str:
    with open(os.path.join(run_dir, "logs", "rank0.log"), encoding="utf-8") as f:
        return f.read()


# ---- tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_trains_two_steps_under_zero3(runs, kind):
    for step, key in STEP_KEYS.items():
        rows = [r for r in read_metrics(runs[kind][step]) if key in r]
        assert [r["step"] for r in rows] == [1, 2], (kind, step, rows)
        with open(os.path.join(runs[kind][step], "config.yaml"), encoding="utf-8") as f:
            config = f.read()
        assert "zero_stage: 3" in config and "zero_stage: 0" not in config, (kind, step)


def test_pad_equal_to_eos_takes_the_unused_special_token_without_growth(runs):
    run = runs["pad_is_eos"]
    base = saved_tokenizer(run["base"])
    assert base.pad_token_id == base.eos_token_id == 2 and len(base) == BASE_VOCAB
    assert vocab_rows(run["base"]) == {"embed": BASE_VOCAB}  # tied: no separate output layer
    for name, folder in saved_folders(run).items():
        assert config_vocab(folder) == BASE_VOCAB, name
        assert vocab_rows(folder) in ({"embed": BASE_VOCAB}, {"embed": BASE_VOCAB, "lm_head": BASE_VOCAB}), name
        tok = saved_tokenizer(folder)
        assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<|endoftext|>", 0, 2), name
        assert len(tok) == BASE_VOCAB, name
    for step in STEP_KEYS:
        log = rank0_log(run[step])
        assert "uses its EOS '<|im_end|>' as PAD" in log, step
        assert "a distinct PAD '<|endoftext|>' (id 0) is used (already in the vocabulary)" in log, step
        assert "embedding grown" not in log, step


def test_no_pad_grows_by_exactly_one_row_and_reloads(runs):
    run = runs["no_pad"]
    assert saved_tokenizer(run["base"]).pad_token_id is None
    assert vocab_rows(run["base"]) == {"embed": BASE_VOCAB, "lm_head": BASE_VOCAB}  # untied
    for name, folder in saved_folders(run).items():
        assert config_vocab(folder) == BASE_VOCAB + 1, name
        causal = name in ("sft", "dpo", "ppo_actor")
        expected = {"embed": BASE_VOCAB + 1, **({"lm_head": BASE_VOCAB + 1} if causal else {})}
        assert vocab_rows(folder) == expected, name
        tok = saved_tokenizer(folder)
        assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<|pad|>", BASE_VOCAB, 1), name
        assert len(tok) == BASE_VOCAB + 1, name
    for step in ("sft", "rm", "dpo"):
        log = rank0_log(run[step])
        assert "a distinct PAD '<|pad|>' (id 300) is used (a new token: the model's embedding grows by one row)" in log
        assert "embedding grown from 300 to 301 rows" in log, step
    # PPO: the actor and reference (the base) grow; the reward model and critic (the saved RM) reload as they are
    assert rank0_log(run["ppo"]).count("embedding grown from 300 to 301 rows") == 2


@pytest.mark.parametrize("kind", STILL_KINDS)
def test_loaded_weights_are_the_base_rows_plus_their_mean(runs, kind):
    """After loading under ZeRO-3 on 2 ranks (saved by gathering the shards), before any real update: the base's rows
    unchanged, and for a grown model exactly one more row, the mean of the base's, in the input and output layers."""
    import torch
    from safetensors.torch import load_file

    def layers(folder: str) -> dict[str, torch.Tensor]:
        weights = load_file(os.path.join(folder, "model.safetensors"))
        return {name: w for name, w in weights.items() if name.endswith(("embed_tokens.weight", "lm_head.weight"))}

    base, loaded = layers(runs[kind]["base"]), layers(os.path.join(runs[kind]["still"], "model"))
    assert sorted(loaded) == sorted(base) == (["model.embed_tokens.weight"] if kind != "no_pad" else
                                              ["lm_head.weight", "model.embed_tokens.weight"])
    grown = kind != "pad_is_eos"
    for name, weight in base.items():
        assert loaded[name].shape == (BASE_VOCAB + grown, weight.shape[1]), name
        torch.testing.assert_close(loaded[name][:BASE_VOCAB], weight, rtol=0, atol=1e-20)
        if grown:
            torch.testing.assert_close(loaded[name][BASE_VOCAB], weight.mean(dim=0), rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in read_metrics(runs[kind]["still"]) if "sft/loss" in r] == [1]


def test_grown_models_reload(runs):
    """The grown SFT folder with plain transformers (finite logits over 301 ids, PAD id usable as input) and through
    rlhf_ds's loader (its PAD is now distinct: nothing added, nothing grown)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.loading import load_causal_lm, load_tokenizer

    folder = saved_folders(runs["no_pad"])["sft"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = saved_tokenizer(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "describe the red fox ."}], tokenize=False,
                                  add_generation_prompt=True)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    batch = torch.tensor([[tok.pad_token_id] * 2 + ids])
    mask = torch.tensor([[0, 0] + [1] * len(ids)])
    logits = model(input_ids=batch, attention_mask=mask).logits
    assert logits.shape[-1] == BASE_VOCAB + 1 and torch.isfinite(logits).all()
    ours = load_tokenizer(folder)
    assert (ours.pad_token_id, getattr(ours, "_rlhf_ds_added_tokens")) == (BASE_VOCAB, 0)
    again = load_causal_lm(folder, {}, tokenizer=ours)
    assert again.get_input_embeddings().weight.shape[0] == BASE_VOCAB + 1


@pytest.mark.parametrize("case", ["chatml", "template_uses_it", "is_unk", "unk_of_a_word_level_tokenizer",
                                  "named_pad", "reserved", "stops_on_it", "none_left"])
def test_which_existing_token_becomes_pad(case, tmp_path):
    """`unused_pad_token`'s rules on tokenizers of `chat_models.py` (milliseconds, no model)."""
    from chat_models import CHATML, build_tokenizer

    from rlhf_ds.models.loading import unused_pad_token

    tok = build_tokenizer("pad_is_eos")
    path = ""
    if case == "template_uses_it":  # a template that writes <|endoftext|> leaves no candidate
        tok.chat_template = CHATML + "{{ '<|endoftext|>' }}"
    elif case == "is_unk":  # SmolLM2 names <|endoftext|> its UNK, which a byte-level BPE never produces: taken
        tok.unk_token = "<|endoftext|>"
    elif case == "unk_of_a_word_level_tokenizer":  # there UNK stands for unknown words in the text: never taken
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        words = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "hi": 2}, unk_token="<unk>"))
        tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>")
    elif case == "named_pad":  # a PAD-named token wins over the lowest unused id
        tok.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    elif case == "reserved":
        tok.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_3|>"]})
    elif case == "stops_on_it":  # generation_config.json stops on <|endoftext|> too
        path = str(tmp_path)
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": [2, 0]}, f)
    elif case == "none_left":
        tok = build_tokenizer("no_pad")
    expected = {"chatml": "<|endoftext|>", "is_unk": "<|endoftext|>", "named_pad": "<|finetune_right_pad_id|>",
                "reserved": "<|reserved_special_token_3|>"}.get(case)
    found = unused_pad_token(tok, path)
    assert (found[0] if found else None) == expected
