"""Step 2: a reward model from pairwise rankings (Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin)).

Humans rank rather than score because raw scores from different annotators are uncalibrated; the loss only sees score
differences, so after training an offset is stored that puts the mean score of a reference set at 0.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch

from rlhf_ds.config import RMConfig
from rlhf_ds.data.batching import eval_batches, micro_batches, steps_per_epoch
from rlhf_ds.data.features import collate_preferences, preference_features
from rlhf_ds.data.formats import load_preferences
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import apply_lora, count_parameters, load_tokenizer
from rlhf_ds.models.scalar_head import load_scalar_head_model, save_scalar_head_model
from rlhf_ds.rl.math import bradley_terry_loss
from rlhf_ds.steps.common import NonFiniteGuard, builtin_data, split_eval, start_step
from rlhf_ds.steps.lm_training import total_optimizer_steps
from rlhf_ds.tracking.metrics import progress
from rlhf_ds.utils import atomic_write_json, is_rank0, rank, world_size

log = logging.getLogger("rlhf_ds")


def pair_scores(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of the chosen and rejected halves of a collated preference batch."""
    dev = strategy.device()
    scores = strategy.unwrap(engine).raw_scores(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def evaluate_rm(engine, features: list[dict], pad_id: int, batch_size: int) -> dict:
    """Pairwise accuracy, BT loss and mean chosen/rejected scores over the whole eval set (exact across ranks)."""
    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # correct, loss, chosen, rejected, n
    for idx, counts in eval_batches(len(features), batch_size, world_size(), rank()):
        chosen, rejected = pair_scores(engine, collate_preferences([features[i] for i in idx], pad_id))
        if counts:
            diff = (chosen - rejected).double()
            sums += torch.tensor([(diff > 0).sum().item(), (-torch.nn.functional.logsigmoid(diff)).sum().item(),
                                  chosen.sum().item(), rejected.sum().item(), len(idx)], dtype=torch.float64)
    sums = strategy.all_reduce_mean(sums) * world_size()
    engine.train()
    n = sums[4].item()
    return {"eval_accuracy": sums[0].item() / n, "eval_loss": sums[1].item() / n, "chosen_score": sums[2].item() / n,
            "rejected_score": sums[3].item() / n, "score_gap": (sums[2] - sums[3]).item() / n}


@torch.no_grad()
def reference_normalisation(engine, features: list[dict], pad_id: int, batch_size: int, with_gain: bool) -> tuple[float, float]:
    """Offset (mean) and gain (1/std) of the raw scores of the chosen responses of `features`."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for idx, counts in eval_batches(len(features), batch_size, world_size(), rank()):
        chosen, _ = pair_scores(engine, collate_preferences([features[i] for i in idx], pad_id))
        if counts:
            c = chosen.double()
            sums += torch.tensor([c.sum().item(), (c * c).sum().item(), len(idx)], dtype=torch.float64)
    s, s2, n = (strategy.all_reduce_mean(sums) * world_size()).tolist()
    mean = s / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return mean, (1.0 / std if with_gain else 1.0)


def run(cfg: RMConfig) -> dict:
    ctx = start_step(cfg, "rm")
    data, train = cfg.data, cfg.train
    train_src, eval_src, builtin_eval_rows = data.train, data.eval, None
    if train_src is None:
        files = builtin_data(cfg.task, cfg.output_dir)
        train_src, eval_src = files["pref_train"], files["pref_eval"]
        with open(eval_src, encoding="utf-8") as f:
            builtin_eval_rows = [json.loads(line) for line in f if line.strip()]
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)

    def featurize(source):
        examples, report = load_preferences(source, fmt=data.format, columns=data.columns, on_bad_row=data.on_bad_row)
        feats, lengths = preference_features(examples, tokenizer, data.max_prompt_tokens, data.max_seq_len, data.prompt_overflow)
        log.info("rm data %s: %s; %s", source, report.summary(), lengths.summary())
        return feats

    train_feats = featurize(train_src)
    eval_feats = featurize(eval_src) if eval_src else None
    train_feats, eval_feats = split_eval(train_feats, eval_feats, data.eval_fraction, train.seed)

    ds_cfg = strategy.ds_config_for(cfg.engine, train.micro_batch_size * 2, train.grad_accum)  # chosen+rejected
    model = load_scalar_head_model(cfg.model, ds_cfg, cfg.engine.precision, trust_remote_code=cfg.trust_remote_code,
                                   tokenizer=tokenizer, head_seed=train.seed)
    if cfg.engine.lora.enabled:
        model.backbone = apply_lora(model.backbone, cfg.engine.lora, task_type="FEATURE_EXTRACTION")
    trainable, total_params = count_parameters(model)
    log.info("rm: %d of %d parameters trainable", trainable, total_params)
    total = total_optimizer_steps(len(train_feats), train)
    per_epoch = steps_per_epoch(len(train_feats), train.micro_batch_size, world_size(), train.grad_accum)
    engine = strategy.init_trainable(model, cfg.engine, ds_cfg, total)
    pad = tokenizer.pad_token_id

    ctx.begin({"model": engine})
    step, loop = ctx.resumed.get("step", 0), ctx.resumed.get("loop", {})
    results = dict(loop.get("results", {}))
    if step == 0:
        results["eval_accuracy_start"] = evaluate_rm(engine, eval_feats, pad, train.eval_batch_size)["eval_accuracy"]
    guard = NonFiniteGuard(train, loop.get("nonfinite_steps", 0))
    t0 = time.time()
    bar = progress(total, "rm", initial=step)
    for epoch in range(step // per_epoch, train.epochs):
        for _, micro in micro_batches(len(train_feats), train.micro_batch_size, world_size(), rank(), train.grad_accum,
                                      train.seed, epoch, start_step=step - epoch * per_epoch):
            if step >= total:
                break
            stats = torch.zeros(2)
            for indices in micro:
                batch = collate_preferences([train_feats[i] for i in indices], pad)
                chosen, rejected = pair_scores(engine, batch)
                dev = chosen.device
                loss = bradley_terry_loss(chosen, rejected, batch["margin"].to(dev), batch["weight"].to(dev))
                guard.backward_and_step(engine, loss, step + 1, "reward-model")
                stats += torch.tensor([loss.item(), (chosen > rejected).float().mean().item()]) / len(micro)
            step += 1
            loss_v, acc_v = strategy.all_reduce_mean(stats).tolist()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", acc=f"{acc_v:.3f}")
            if step % train.log_every == 0 or step == total:
                ctx.metrics.log({"rm/loss": loss_v, "rm/accuracy": acc_v, "rm/lr": engine.get_lr()[0], "rm/epoch": epoch}, step=step)
            if train.eval_every and step % train.eval_every == 0 and step < total:
                ctx.metrics.log({f"rm/{k}": v for k, v in evaluate_rm(engine, eval_feats, pad, train.eval_batch_size).items()}, step=step)
            ctx.checkpoint.after_step(step, lambda: {"loop": {"results": results, "epoch": epoch,
                                                              "nonfinite_steps": guard.skipped}})
    bar.close()
    final = evaluate_rm(engine, eval_feats, pad, train.eval_batch_size)
    ctx.metrics.log({f"rm/{k}": v for k, v in final.items()}, step=step)
    results.update(final, steps=step, seconds=time.time() - t0, trainable_params=trainable, total_params=total_params,
                   nonfinite_steps=guard.skipped)
    if builtin_eval_rows is not None:
        from rlhf_ds.data.builtin_task import BuiltinTask

        results["bayes_ceiling"] = BuiltinTask.bayes_ceiling(builtin_eval_rows)

    unwrapped = strategy.unwrap(engine)
    if cfg.normalize_on == "chosen":
        unwrapped.offset, unwrapped.gain = reference_normalisation(engine, eval_feats, pad, train.eval_batch_size, cfg.normalize_gain)
    results.update(score_offset=unwrapped.offset, score_gain=unwrapped.gain)
    save_scalar_head_model(unwrapped, tokenizer, os.path.join(cfg.output_dir, "model"),
                           {"normalize_on": cfg.normalize_on, "eval_accuracy": final["eval_accuracy"]})
    if is_rank0():
        atomic_write_json(os.path.join(cfg.output_dir, "results.json"), results)
    ctx.metrics.summary(results)
    ctx.metrics.close()
    return results
