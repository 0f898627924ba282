"""Step 1: supervised fine-tuning on demonstrations (loss on response tokens by default)."""
from __future__ import annotations

import logging
import os

from rlhf_ds.config import SFTConfig
from rlhf_ds.data.features import sft_features
from rlhf_ds.data.formats import load_sft
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import apply_lora, count_parameters, load_causal_lm, load_tokenizer, save_causal_lm
from rlhf_ds.steps.common import builtin_data, fit_budgets, global_batch, split_eval, start_step
from rlhf_ds.steps.lm_training import train_lm
from rlhf_ds.steps.loop import total_optimizer_steps

log = logging.getLogger("rlhf_ds")


def log_partitioning(engine) -> None:
    """Debug line (every rank's log): how much of the ZeRO-3-partitioned parameters this rank holds."""
    parts = [p for p in strategy.unwrap(engine).parameters() if strategy.is_partitioned(p)]
    if parts:
        held = sum(p.ds_tensor.numel() for p in parts)
        full = sum(p.ds_numel for p in parts)
        log.info("zero-3 partitions: %d tensors, this rank holds %d of %d elements", len(parts), held, full)


def run(cfg: SFTConfig) -> dict:
    ctx = start_step(cfg, "sft")
    data = cfg.data
    train_src, eval_src = data.train, data.eval
    if train_src is None:
        files = builtin_data(cfg.task, cfg.output_dir)
        train_src, eval_src = files["sft_train"], files["sft_eval"]
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)

    def read(source):
        examples, report = load_sft(source, fmt=data.format, columns=data.columns, on_bad_row=data.on_bad_row,
                                   template=data.template, seed=cfg.train.seed)
        return source, examples, report

    def featurize(source, examples, report):
        feats, lengths = sft_features(
            examples, tokenizer, data.max_prompt_tokens, data.max_seq_len, data.prompt_overflow, cfg.loss_on_prompt
        )
        log.info("sft data %s: %s; %s", source, report.summary(), lengths.summary())
        return feats

    sets = [read(train_src), *([read(eval_src)] if eval_src else [])]
    log.info("sft: %s", fit_budgets(cfg, tokenizer, [ex for _, examples, _ in sets for ex in examples], cfg.model))
    train_feats = featurize(*sets[0])
    eval_feats = featurize(*sets[1]) if eval_src else None
    # held out, and what is left fills a global batch: refused here, before any model loads
    train_feats, eval_feats = split_eval(train_feats, eval_feats, data.eval_split, cfg.train.seed, "examples",
                                         global_batch(cfg.train))
    total_steps = total_optimizer_steps(len(train_feats), cfg.train)

    ds_cfg = strategy.ds_config_for(cfg.engine, cfg.train.micro_batch_size, cfg.train.grad_accum)
    model = load_causal_lm(cfg.model, ds_cfg, cfg.engine.precision, trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    if cfg.engine.lora.enabled:
        model = apply_lora(model, cfg.engine.lora)
    trainable, total = count_parameters(model)
    log.info("sft: %d of %d parameters trainable (%.2f%%)", trainable, total, 100.0 * trainable / total)

    engine = strategy.init_trainable(model, cfg.engine, ds_cfg, total_steps)
    log_partitioning(engine)
    ctx.begin({"model": engine})
    results = train_lm(engine, train_feats, eval_feats, tokenizer.pad_token_id, cfg.train, ctx, "sft",
                       cfg.engine.logit_chunk_tokens)
    results.update(trainable_params=trainable, total_params=total)
    save_causal_lm(strategy.unwrap(engine), tokenizer, os.path.join(cfg.output_dir, "model"))
    return ctx.finish(results)
