"""Tiny chat checkpoints shaped like current instruction-tuned models, built locally in seconds (no hub, no CLI runs).

    build_chat_model(out_dir, kind) -> out_dir

Both are LLaMA-family (grouped-query attention: 2 heads, 1 KV head), random-initialised, with a byte-level BPE of
~300 tokens and a ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`), BOS `<|im_start|>` and EOS
`<|im_end|>` as in SmolLM2-Instruct:

  pad_is_eos  PAD == EOS (`<|im_end|>`), tied embeddings, and an unused special token `<|endoftext|>` at id 0 (in no
              role and not in the chat template): the one rlhf_ds should use as PAD, without growing the vocabulary
  no_pad      no PAD at all and no spare special token (only `<|im_start|>`, `<|im_end|>`, both used by the template),
              untied input/output embeddings: rlhf_ds must add a PAD and grow both by one row (under ZeRO-3)
  no_pad_tied the same with tied embeddings (the output layer must keep sharing the grown input weight)

Plus `write_chat_data(root)`: a few chat SFT rows, preference pairs (ChatML-rendered prompts) and chat prompts.
"""
from __future__ import annotations

import json
import os

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
KINDS = {
    # kind -> (special tokens in id order, PAD token, tied embeddings)
    "pad_is_eos": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", True),
    "no_pad": (["<|im_start|>", "<|im_end|>"], None, False),
    "no_pad_tied": (["<|im_start|>", "<|im_end|>"], None, True),
}
VOCAB = 300
SUBJECTS = ["red fox", "old boat", "tall tree", "small bird", "green hill", "quiet lake", "warm bread", "bright star"]


def _corpus() -> list[str]:
    words = " ".join(SUBJECTS).split() + ["the", "is", "nice", "describe", "user", "assistant", "system", "a", "it"]
    return [f"describe the {s} . the {s} is nice . {' '.join(words[i % len(words):])}" for i, s in
            enumerate(SUBJECTS * 8)]


def build_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, pad, _ = KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    roles = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if pad is not None:
        roles["pad_token"] = pad
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **roles)
    fast.chat_template = CHATML
    return fast


def build_chat_model(out_dir: str, kind: str, seed: int = 0) -> str:
    """A random-initialised tiny LLaMA chat model and its tokenizer in `out_dir` (reused when already built)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tok = build_tokenizer(kind)
    tied = KINDS[kind][2]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def chatml_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def write_chat_data(root: str) -> dict[str, str]:
    """{"sft", "prefs", "prompts"}: JSONL files of 8 rows each (chat messages, or ChatML-rendered prompts)."""
    os.makedirs(root, exist_ok=True)
    sft = [{"messages": [{"role": "user", "content": f"describe the {s} ."},
                         {"role": "assistant", "content": f"the {s} is nice ."}]} for s in SUBJECTS]
    prefs = [{"prompt": chatml_prompt(f"describe the {s} ."), "chosen": f"the {s} is nice .",
              "rejected": f"{s} {s} {s}"} for s in SUBJECTS]
    prompts = [{"messages": [{"role": "user", "content": f"describe the {s} ."}]} for s in SUBJECTS]
    return {"sft": write_jsonl(os.path.join(root, "sft.jsonl"), sft),
            "prefs": write_jsonl(os.path.join(root, "prefs.jsonl"), prefs),
            "prompts": write_jsonl(os.path.join(root, "prompts.jsonl"), prompts)}
