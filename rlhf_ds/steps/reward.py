"""Step 2: a reward model from pairwise rankings (Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin)).

Humans rank rather than score because raw scores from different annotators are uncalibrated; the loss only sees score
differences, so after training an offset is stored that puts the mean score of a reference set at 0.
"""
from __future__ import annotations

import json
import logging
import math
import os

import torch

from rlhf_ds.config import RMConfig
from rlhf_ds.data.features import collate_preferences, pair_tokens, pair_weight
from rlhf_ds.data.formats import source_templates
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import apply_lora, count_parameters, load_tokenizer
from rlhf_ds.models.scalar_head import last_token_scores, load_scalar_head_model, save_scalar_head_model
from rlhf_ds.rl.math import bradley_terry_loss
from rlhf_ds.steps import loop
from rlhf_ds.steps.common import preference_data, start_step

log = logging.getLogger("rlhf_ds")


def pair_scores(engine, batch: dict, packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of the chosen and rejected halves of a collated preference batch."""
    dev = strategy.device()
    scores = last_token_scores(engine, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), packing)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def evaluate_rm(engine, features: list[dict], pad_id: int, batch_size: int, packing: bool = False) -> dict:
    """Pairwise accuracy, BT loss and mean chosen/rejected scores over the whole eval set (exact across ranks)."""

    def sums(idx: list[int]) -> torch.Tensor:
        chosen, rejected = pair_scores(engine, collate_preferences([features[i] for i in idx], pad_id), packing)
        diff = (chosen - rejected).double()
        return torch.tensor([(diff > 0).sum().item(), (-torch.nn.functional.logsigmoid(diff)).sum().item(),
                             chosen.sum().item(), rejected.sum().item(), len(idx)], dtype=torch.float64)

    correct, loss, chosen, rejected, n = loop.eval_sums(engine, len(features), batch_size, sums).tolist()
    return {"eval_accuracy": correct / n, "eval_loss": loss / n, "chosen_score": chosen / n,
            "rejected_score": rejected / n, "score_gap": (chosen - rejected) / n}


def reference_normalisation(engine, features: list[dict], pad_id: int, batch_size: int, with_gain: bool,
                            packing: bool = False) -> tuple[float, float]:
    """Offset (mean) and gain (1/std) of the raw scores of the chosen responses of `features`."""

    def sums(idx: list[int]) -> torch.Tensor:
        c = pair_scores(engine, collate_preferences([features[i] for i in idx], pad_id), packing)[0].double()
        return torch.tensor([c.sum().item(), (c * c).sum().item(), len(idx)], dtype=torch.float64)

    s, s2, n = loop.eval_sums(engine, len(features), batch_size, sums).tolist()
    mean = s / n
    std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
    return mean, (1.0 / std if with_gain else 1.0)


def normalisation_pairs(cfg: RMConfig, train_feats: list[dict], eval_feats: list[dict]) -> tuple[list[dict], str]:
    """The pairs whose chosen responses set the score offset (`normalize_on: chosen`) and which they are: the held-out
    pairs, or the training pairs when nothing is held out (no data.eval, data.eval_split=0). The offset only centres
    the scores PPO sees; the training pairs come from the same distribution, and refusing would make a user who holds
    nothing out on purpose choose between giving up pairs and raw scores."""
    if eval_feats:
        return eval_feats, "held-out"
    if cfg.normalize_on == "chosen":
        log.info("rm: no held-out pairs (data.eval is not set and data.eval_split=0): the score offset%s will be set "
                 "on the chosen responses of the %d training pairs", " and gain" if cfg.normalize_gain else "",
                 len(train_feats))
    return train_feats, "training"


def run(cfg: RMConfig) -> dict:
    ctx = start_step(cfg, "rm")
    data, train = cfg.data, cfg.train
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_feats, eval_feats, builtin = preference_data(cfg, tokenizer, "rm")  # refuses too little data
    total_steps = loop.total_optimizer_steps(len(train_feats), train)
    norm_feats, norm_pairs = normalisation_pairs(cfg, train_feats, eval_feats)

    ds_cfg = strategy.ds_config_for(cfg.engine, train.micro_batch_size * 2, train.grad_accum)  # chosen+rejected
    model = load_scalar_head_model(cfg.model, ds_cfg, cfg.engine.precision, trust_remote_code=cfg.trust_remote_code,
                                   tokenizer=tokenizer, head_seed=train.seed)
    if cfg.engine.lora.enabled:
        model.backbone = apply_lora(model.backbone, cfg.engine.lora, task_type="FEATURE_EXTRACTION")
    trainable, total_params = count_parameters(model)
    log.info("rm: %d of %d parameters trainable", trainable, total_params)
    engine = strategy.init_trainable(model, cfg.engine, ds_cfg, total_steps)
    pad = tokenizer.pad_token_id

    def loss(batch: dict):
        chosen, rejected = pair_scores(engine, batch, train.packing)
        value = bradley_terry_loss(chosen, rejected, batch["margin"], batch["weight"])
        return value, {"loss": value.item(), "accuracy": (chosen > rejected).float().mean().item()}

    ctx.begin({"model": engine})
    task = loop.TrainTask(
        name="rm", features=train_feats, collate=lambda feats: collate_preferences(feats, pad), loss=loss,
        count=lambda batch: len(batch["margin"]), weight=pair_weight,
        length=pair_tokens, unit="pairs", what="reward-model", postfix=("loss", "accuracy"),
        evaluate=(lambda: evaluate_rm(engine, eval_feats, pad, train.eval_batch_size, train.packing))
        if eval_feats else None)
    results = loop.run(engine, task, train, ctx)
    results.update(trainable_params=trainable, total_params=total_params)
    if builtin:
        from rlhf_ds.data.builtin_task import BuiltinTask

        with open(BuiltinTask.file_paths(os.path.join(cfg.output_dir, "data"))["pref_eval"], encoding="utf-8") as f:
            results["bayes_ceiling"] = BuiltinTask.bayes_ceiling([json.loads(line) for line in f if line.strip()])

    unwrapped = strategy.unwrap(engine)
    if cfg.normalize_on == "chosen":
        unwrapped.offset, unwrapped.gain = reference_normalisation(engine, norm_feats, pad, train.eval_batch_size,
                                                                   cfg.normalize_gain, train.packing)
        log.info("rm: score offset %.6g, gain %.6g from the chosen responses of the %d %s pairs", unwrapped.offset,
                 unwrapped.gain, len(norm_feats), norm_pairs)
        results.update(normalize_pairs=norm_pairs, normalize_count=len(norm_feats))
    results.update(score_offset=unwrapped.offset, score_gain=unwrapped.gain)
    save_scalar_head_model(unwrapped, tokenizer, os.path.join(cfg.output_dir, "model"),
                           {"normalize_on": cfg.normalize_on,
                            **({"normalize_pairs": norm_pairs} if cfg.normalize_on == "chosen" else {}),
                            "eval_accuracy": results.get("eval_accuracy"),
                            "prompt_templates": source_templates(data.train, data.template)})
    return ctx.finish(results)
