"""Step 0: train a tokenizer and a small causal LM from scratch on a text corpus.

The tokenizer is a byte-level BPE (every string, newlines, tabs, runs of spaces and any Unicode included, encodes
without an unknown token and decodes back to itself) with distinct PAD/BOS/EOS tokens. The model is GPT-2 or LLaMA
style, built from config outside ZeRO (transformers' weight init can fail under `zero.Init` for some architectures),
saved, then trained by the shared LM loop.
"""
from __future__ import annotations

import logging
import os

from rlhf_ds.config import ArchConfig, PretrainConfig
from rlhf_ds.data.corpus import pack, read_corpus
from rlhf_ds.data.readers import DataError
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import load_causal_lm, load_tokenizer, save_causal_lm
from rlhf_ds.steps.common import builtin_data, eval_count, global_batch, start_step
from rlhf_ds.steps.lm_training import train_lm
from rlhf_ds.steps.loop import total_optimizer_steps
from rlhf_ds.utils import atomic_directory, barrier, is_rank0

log = logging.getLogger("rlhf_ds")

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: the 256 byte symbols are always in the vocabulary, so no text needs an unknown token, and decoding
    (no normalizer, no prefix space, no clean-up of spaces) gives back exactly the text that was encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


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


def split_blocks(cfg: PretrainConfig, tokenizer, texts: list[str], eval_texts: list[str] | None) -> tuple[list, list]:
    """(training, held-out) blocks: `data.eval`'s, or the first `data.eval_split` blocks of the corpus (a block drawn
    from the middle of the stream shares documents with its neighbours in the training set). Too few blocks for that,
    or for one global batch, is a DataError naming data.eval_split and the blocks there are."""
    block = cfg.data.max_seq_len
    blocks = pack(texts, tokenizer, block)
    try:
        n_eval = eval_count(len(blocks), 0 if eval_texts else cfg.data.eval_split, "blocks", global_batch(cfg.train))
    except DataError as err:
        raise DataError(f"{err.detail} (the {len(texts)} documents pack into {len(blocks)} blocks of {block} tokens; "
                        "pretraining holds out blocks)") from None
    if eval_texts:
        return blocks, pack(eval_texts, tokenizer, block)
    return blocks[n_eval:], blocks[:n_eval]


def run(cfg: PretrainConfig) -> dict:
    ctx = start_step(cfg, "pretrain")
    source = cfg.data.train or builtin_data(cfg.task, cfg.output_dir)["pretrain"]
    texts = read_corpus(source, cfg.data.text_documents, cfg.train.seed)
    eval_texts = read_corpus(cfg.data.eval, cfg.data.text_documents, cfg.train.seed) if cfg.data.eval else None
    init_dir = os.path.join(cfg.output_dir, "init")
    fresh = not (ctx.checkpoint.resume_path and os.path.isdir(init_dir))  # a resumed run keeps its tokenizer
    problem = None
    if is_rank0() and fresh:
        tokenizer = train_tokenizer(texts, cfg.arch.vocab_size)
        try:  # the blocks are counted before the model is built or anything is written (no init/)
            split_blocks(cfg, tokenizer, texts, eval_texts)
        except DataError as err:
            problem = err
    problem = strategy.broadcast_object(problem)  # every rank refuses the same way
    if problem is not None:
        raise problem
    if is_rank0() and fresh:
        with atomic_directory(init_dir) as tmp:
            build_model(cfg.arch, tokenizer).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    barrier()
    tokenizer = load_tokenizer(init_dir)
    train_blocks, eval_blocks = split_blocks(cfg, tokenizer, texts, eval_texts)
    log.info("pretrain: %d texts -> %d blocks of %d tokens (%d held out); vocab %d", len(texts), len(train_blocks),
             cfg.data.max_seq_len, len(eval_blocks), len(tokenizer))

    ds_cfg = strategy.ds_config_for(cfg.engine, cfg.train.micro_batch_size, cfg.train.grad_accum)
    model = load_causal_lm(init_dir, ds_cfg, cfg.engine.precision, tokenizer=tokenizer)
    engine = strategy.init_trainable(model, cfg.engine, ds_cfg, total_optimizer_steps(len(train_blocks), cfg.train))
    ctx.begin({"model": engine})
    results = train_lm(engine, train_blocks, eval_blocks, tokenizer.pad_token_id, cfg.train, ctx, "pretrain",
                       cfg.engine.logit_chunk_tokens)
    save_causal_lm(strategy.unwrap(engine), tokenizer, os.path.join(cfg.output_dir, "model"))
    results["vocab_size"] = len(tokenizer)
    return ctx.finish(results)
