"""Offline preference optimisation (`rlhf-ds dpo`): DPO, conservative DPO, IPO or SimPO on preference pairs, with an
optional SFT term on the chosen responses (RPO-style); no reward model, no sampling.

The policy (from `model`, usually the SFT output) trains; the reference is frozen. The reference log-probs of a pair
come from one of four places, decided once:

* `precomputed`: `dpo.precompute_reference=true` scores every pair with the reference before the policy is loaded,
  writes them atomically to a safetensors cache whose metadata holds a fingerprint of the tokenised pairs and the
  reference weights (a later run with the same data and reference reads it instead of recomputing), and frees the
  reference: it is not in memory while the policy trains;
* `adapters_off`: with LoRA and no `reference.model`, the policy itself with its adapters switched off (its frozen
  base is the starting point), so no second copy is loaded;
* `engine`: a frozen DeepSpeed engine of `reference.model` (default: `model`), ZeRO-3 by default like the policy;
* `none`: a loss that needs no reference (SimPO).

Sequence log-probs are sums over response tokens (averages for SimPO and IPO by default, `dpo.length_normalize`),
computed with position ids that count real tokens, so a pair's log-probs do not depend on the batch it is in.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from typing import Callable, Optional

import torch

from rlhf_ds.config import DPOConfig
from rlhf_ds.data.features import collate_preferences, pair_tokens, pair_weight
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import apply_lora, count_parameters, load_causal_lm, load_tokenizer, resolve_model_dir, \
    save_causal_lm
from rlhf_ds.models.inputs import token_logprobs
from rlhf_ds.rl.math import weighted_mean
from rlhf_ds.rl.preference import LOSSES, preference_loss, sequence_logps
from rlhf_ds.steps import loop
from rlhf_ds.steps.common import preference_data, start_step
from rlhf_ds.utils import atomic_write_bytes, barrier, is_rank0

log = logging.getLogger("rlhf_ds")

CACHE_VERSION = "1"


def pair_logps(model, batch: dict, packing: bool = False, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs, response token counts) of the [2B] rows of a collated preference batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logp = token_logprobs(model, ids, mask, packing, chunk_tokens=chunk_tokens)
    return sequence_logps(logp, ids, mask, batch["prompt_lens"].repeat(2))


def pair_terms(d, policy: torch.Tensor, counts: torch.Tensor, ref: Optional[torch.Tensor]):
    """Per-pair (losses, chosen rewards, rejected rewards) from the [2B] summed log-probs of policy and reference."""
    if d.averages():
        policy = policy / counts
        ref = None if ref is None else ref / counts
    half = policy.shape[0] // 2
    ref_c, ref_r = (None, None) if ref is None else (ref[:half], ref[half:])
    return preference_loss(d.loss, policy[:half], policy[half:], ref_c, ref_r, beta=d.beta,
                           label_smoothing=d.label_smoothing, gamma=d.simpo_gamma)


# ---- the reference ---------------------------------------------------------------------------------------------------
def frozen_reference(cfg: DPOConfig, tokenizer, micro: int):
    path = cfg.reference.model or cfg.model
    ds_cfg = strategy.ds_config_for(cfg.reference.engine, micro, inference=True)
    model = load_causal_lm(path, ds_cfg, cfg.reference.engine.precision, disable_dropout=True,
                           trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    return strategy.init_frozen(model, ds_cfg)


def fingerprint(cfg: DPOConfig, sets: dict[str, list[dict]]) -> str:
    """What the cached log-probs depend on: the tokenised pairs, the reference's weight files and its precision."""
    h = hashlib.sha256(f"rlhf_ds reference log-probs v{CACHE_VERSION}".encode())
    folder = resolve_model_dir(cfg.reference.model or cfg.model)
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pt", ".json")))
    h.update(json.dumps([os.path.abspath(folder), cfg.reference.engine.precision,
                         [(f, os.path.getsize(os.path.join(folder, f)), os.stat(os.path.join(folder, f)).st_mtime_ns)
                          for f in files]]).encode())
    for name, feats in sets.items():
        h.update(name.encode())
        for f in feats:
            h.update(json.dumps([f["prompt_len"], f["chosen_ids"], f["rejected_ids"]]).encode())
    return h.hexdigest()


def read_cache(path: str, key: str, sets: dict[str, list[dict]]) -> Optional[dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                log.info("reference cache %s was made for other data or another reference: recomputing", path)
                return None
            table = {name: f.get_tensor(name) for name in sets}
    except Exception as e:  # an unreadable file is recomputed, never trusted
        log.warning("reference cache %s unreadable (%s): recomputing", path, e)
        return None
    if any(table[name].shape != (2, len(feats)) for name, feats in sets.items()):
        return None
    return table


def precompute_reference(cfg: DPOConfig, tokenizer, sets: dict[str, list[dict]]) -> str:
    """Attach `ref_chosen`/`ref_rejected` to every pair of `sets` from the cache, or from one pass of the reference
    (then written to the cache). The reference is freed before returning. Returns the cache path."""
    from safetensors.torch import save

    path = cfg.dpo.reference_cache or os.path.join(cfg.output_dir, "reference_logps.safetensors")
    key = fingerprint(cfg, sets)
    table = read_cache(path, key, sets)
    if table is None:
        pad, micro = tokenizer.pad_token_id, cfg.train.micro_batch_size
        reference = frozen_reference(cfg, tokenizer, 2 * micro)
        table = {}
        for name, feats in sets.items():
            n = len(feats)

            def sums(idx: list[int]) -> torch.Tensor:  # this batch's values at their places of a [2, n] table
                batch = loop.to_device(collate_preferences([feats[i] for i in idx], pad))
                logps, _ = pair_logps(reference, batch, cfg.train.packing, cfg.reference.engine.logit_chunk_tokens)
                out = torch.zeros(2, n, dtype=torch.float64)
                out[:, idx] = logps.detach().to("cpu", torch.float64).view(2, len(idx))
                return out.view(-1)

            table[name] = loop.eval_sums(reference, n, cfg.train.eval_batch_size, sums).view(2, n)
        del reference
        gc.collect()
        from deepspeed.accelerator import get_accelerator

        get_accelerator().empty_cache()
        if is_rank0():
            atomic_write_bytes(path, save({k: v.contiguous() for k, v in table.items()}, metadata={"fingerprint": key}))
            log.info("reference log-probs of %s cached in %s", {k: len(v) for k, v in sets.items()}, path)
        barrier()
    else:
        log.info("reference log-probs read from %s (fingerprint matches)", path)
    for name, feats in sets.items():
        for i, f in enumerate(feats):
            f["ref_chosen"], f["ref_rejected"] = table[name][0, i].item(), table[name][1, i].item()
    return path


# ---- evaluation --------------------------------------------------------------------------------------------------------
EVAL_KEYS = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
             "logp_rejected")


def evaluate_dpo(engine, reference: Callable[[dict], Optional[torch.Tensor]], d, features: list[dict], pad_id: int,
                 batch_size: int, packing: bool = False, chunk_tokens: int = 0) -> dict:
    """Held-out pairs: preference loss (pair-weighted), implicit rewards, margin, accuracy, summed log-probs."""

    def sums(idx: list[int]) -> torch.Tensor:
        batch = loop.to_device(collate_preferences([features[i] for i in idx], pad_id))
        policy, counts = pair_logps(engine, batch, packing, chunk_tokens)
        losses, chosen, rejected = pair_terms(d, policy, counts, reference(batch))
        w, half = batch["weight"].double(), len(idx)
        return torch.tensor([(losses.double() * w).sum().item(), w.sum().item(), chosen.sum().item(),
                             rejected.sum().item(), (chosen - rejected).sum().item(),
                             (chosen > rejected).sum().item(), policy[:half].sum().item(), policy[half:].sum().item(),
                             half], dtype=torch.float64)

    wl, w, *rest, n = loop.eval_sums(engine, len(features), batch_size, sums).tolist()
    return {f"eval_{k}": v for k, v in zip(EVAL_KEYS, [wl / w, *(x / n for x in rest)])}


# ---- the step ----------------------------------------------------------------------------------------------------------
def run(cfg: DPOConfig) -> dict:
    ctx = start_step(cfg, "dpo")
    train, d = cfg.train, cfg.dpo
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_feats, eval_feats, _ = preference_data(cfg, tokenizer, "dpo")
    total_steps = loop.total_optimizer_steps(len(train_feats), train)  # refuses too little data before any model loads
    pad, micro = tokenizer.pad_token_id, 2 * train.micro_batch_size  # chosen + rejected rows

    cache = None
    if d.precompute_reference:
        cache = precompute_reference(cfg, tokenizer, {k: v for k, v in (("train", train_feats), ("eval", eval_feats)) if v})

    ds_cfg = strategy.ds_config_for(cfg.engine, micro, train.grad_accum)
    model = load_causal_lm(cfg.model, ds_cfg, cfg.engine.precision, disable_dropout=True,
                           trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    if cfg.engine.lora.enabled:
        model = apply_lora(model, cfg.engine.lora)
    trainable, total_params = count_parameters(model)
    log.info("dpo: %d of %d parameters trainable", trainable, total_params)
    engine = strategy.init_trainable(model, cfg.engine, ds_cfg, total_steps)
    chunk = cfg.engine.logit_chunk_tokens

    ref_engine = None
    if not LOSSES.get(d.loss).needs_reference:
        source = "none"
    elif cache is not None:
        source = "precomputed"
    elif cfg.engine.lora.enabled and cfg.reference.model is None:
        source = "adapters_off"
    else:
        source = "engine"
        ref_engine = frozen_reference(cfg, tokenizer, micro)

    @torch.no_grad()
    def reference(batch: dict) -> Optional[torch.Tensor]:
        if "ref_logps" in batch:
            return batch["ref_logps"].float()  # cached float32 values, exactly (float32 -> float64 -> float32)
        if source == "engine":
            return pair_logps(ref_engine, batch, train.packing, cfg.reference.engine.logit_chunk_tokens)[0]
        if source == "adapters_off":
            with strategy.unwrap(engine).disable_adapter():
                return pair_logps(engine, batch, train.packing, chunk)[0]
        return None

    log.info("dpo: %s loss, beta %g; reference log-probs: %s", d.loss, d.beta, source)

    def loss(batch: dict):
        policy, counts = pair_logps(engine, batch, train.packing, chunk)
        losses, chosen, rejected = pair_terms(d, policy, counts, reference(batch))
        value = weighted_mean(losses, batch["weight"])
        half = chosen.shape[0]
        stats = {}
        if d.sft_coef:
            nll = -policy[:half].sum() / counts[:half].sum()
            value = value + d.sft_coef * nll
            stats["sft_loss"] = nll.item()
        logp = policy.detach()
        stats.update(loss=value.item(), reward_chosen=chosen.mean().item(), reward_rejected=rejected.mean().item(),
                     reward_margin=(chosen - rejected).mean().item(),
                     reward_accuracy=(chosen > rejected).float().mean().item(),
                     logp_chosen=logp[:half].mean().item(), logp_rejected=logp[half:].mean().item())
        return value, stats

    ctx.begin({"model": engine})
    task = loop.TrainTask(
        name="dpo", features=train_feats, collate=lambda feats: collate_preferences(feats, pad), loss=loss,
        count=lambda batch: len(batch["weight"]), weight=pair_weight,
        length=pair_tokens, unit="pairs", postfix=("loss", "reward_accuracy", "logp_chosen"),
        evaluate=(lambda: evaluate_dpo(engine, reference, d, eval_feats, pad, train.eval_batch_size, train.packing,
                                       chunk))
        if eval_feats else None)
    results = loop.run(engine, task, train, ctx)
    results.update(trainable_params=trainable, total_params=total_params, loss_type=d.loss, beta=d.beta,
                   reference=source, **({"reference_cache": cache} if cache else {}))
    save_causal_lm(strategy.unwrap(engine), tokenizer, os.path.join(cfg.output_dir, "model"))
    return ctx.finish(results)
