"""Step 0: train a tokenizer and a small causal LM from scratch on a text corpus.

The tokenizer is a BPE with Metaspace word boundaries (clean decode, whole-word tokens for a small vocabulary) and
distinct PAD/BOS/EOS/UNK tokens. The model is GPT-2 or LLaMA style, built from config outside ZeRO (transformers'
weight init can fail under `zero.Init` for some architectures), saved, then trained by the shared LM loop.
"""
from __future__ import annotations

import logging
import os

from rlhf_ds.config import ArchConfig, PretrainConfig
from rlhf_ds.data.readers import read_records
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import load_causal_lm, load_tokenizer, save_causal_lm
from rlhf_ds.steps.common import builtin_data, start_step
from rlhf_ds.steps.lm_training import total_optimizer_steps, train_lm
from rlhf_ds.utils import atomic_directory, atomic_write_json, barrier, is_rank0

log = logging.getLogger("rlhf_ds")

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|unk|>"}


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_model(arch: ArchConfig, tokenizer):
    """A freshly initialised causal LM of the named architecture (dropout off: small data, and RL wants it off)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    inter = arch.intermediate or 4 * arch.hidden
    if arch.type == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=arch.max_positions, n_embd=arch.hidden, n_layer=arch.n_layers,
            n_head=arch.n_heads, n_inner=inter, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=inter,
            num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_heads,
            max_position_embeddings=arch.max_positions, tie_word_embeddings=True, **ids,
        )
    return AutoModelForCausalLM.from_config(config)


def read_corpus(source: str) -> list[str]:
    """Texts from a `text` column (JSONL/Parquet/CSV/save_to_disk) or a plain .txt file (one document per line)."""
    if source.endswith(".txt"):
        with open(source, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    from rlhf_ds.data.formats import MAX_TEXT_CHARS
    from rlhf_ds.data.readers import DataError

    texts = []
    for rec in read_records(source):
        text = rec.data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError("missing or empty text", rec.file, rec.row, "text")
        if len(text) > MAX_TEXT_CHARS:
            raise DataError(f"text of {len(text):,} characters exceeds the {MAX_TEXT_CHARS:,}-character limit; split "
                            "long documents", rec.file, rec.row, "text")
        texts.append(text)
    return texts


def pack(texts: list[str], tokenizer, block: int) -> list[dict]:
    """Concatenate BOS doc EOS ... and cut into full blocks of `block` tokens (no padding wasted)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return [{"input_ids": stream[i : i + block], "labels": stream[i : i + block]} for i in range(0, len(stream) - block + 1, block)]


def run(cfg: PretrainConfig) -> dict:
    ctx = start_step(cfg, "pretrain")
    source = cfg.data.train or builtin_data(cfg.task, cfg.output_dir)["pretrain"]
    texts = read_corpus(source)
    init_dir = os.path.join(cfg.output_dir, "init")
    if is_rank0() and not (ctx.checkpoint.resume_path and os.path.isdir(init_dir)):  # a resumed run keeps its tokenizer
        tokenizer = train_tokenizer(texts, cfg.arch.vocab_size)
        with atomic_directory(init_dir) as tmp:
            build_model(cfg.arch, tokenizer).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    barrier()
    tokenizer = load_tokenizer(init_dir)
    blocks = pack(texts, tokenizer, cfg.data.max_seq_len)
    n_eval = max(1, int(len(blocks) * cfg.data.eval_fraction))
    train_blocks, eval_blocks = blocks[n_eval:], blocks[:n_eval]
    log.info("pretrain: %d texts -> %d blocks of %d tokens (%d held out); vocab %d", len(texts), len(blocks),
             cfg.data.max_seq_len, n_eval, len(tokenizer))

    ds_cfg = strategy.ds_config_for(cfg.engine, cfg.train.micro_batch_size, cfg.train.grad_accum)
    model = load_causal_lm(init_dir, ds_cfg, cfg.engine.precision, tokenizer=tokenizer)
    engine = strategy.init_trainable(model, cfg.engine, ds_cfg, total_optimizer_steps(len(train_blocks), cfg.train))
    ctx.begin({"model": engine})
    results = train_lm(engine, train_blocks, eval_blocks, tokenizer.pad_token_id, cfg.train, ctx, "pretrain")
    save_causal_lm(strategy.unwrap(engine), tokenizer, os.path.join(cfg.output_dir, "model"))
    results["vocab_size"] = len(tokenizer)
    if is_rank0():
        atomic_write_json(os.path.join(cfg.output_dir, "results.json"), results)
    ctx.metrics.summary(results)
    ctx.metrics.close()
    return results
