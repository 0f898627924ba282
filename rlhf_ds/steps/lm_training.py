"""The causal-LM training loop shared by step 0 (pretraining) and step 1 (SFT): next-token loss on labelled tokens."""
from __future__ import annotations

import logging
import math
import time

import torch

from rlhf_ds.config import TrainConfig
from rlhf_ds.data.batching import eval_batches, micro_batches, steps_per_epoch
from rlhf_ds.data.features import collate_sft
from rlhf_ds.engine import strategy
from rlhf_ds.steps.common import NonFiniteGuard, StepContext
from rlhf_ds.tracking.metrics import progress
from rlhf_ds.utils import rank, world_size

log = logging.getLogger("rlhf_ds")


def total_optimizer_steps(n_train: int, train: TrainConfig) -> int:
    per_epoch = steps_per_epoch(n_train, train.micro_batch_size, world_size(), train.grad_accum)
    if per_epoch == 0:
        raise ValueError(
            f"{n_train} training examples cannot fill one global batch of "
            f"{train.micro_batch_size} x {world_size()} ranks x {train.grad_accum} accumulation steps"
        )
    total = per_epoch * train.epochs
    return min(total, train.max_steps) if train.max_steps else total


def _to_device(batch: dict) -> dict:
    dev = strategy.device()
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def lm_loss(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token NLL, number of labelled tokens) for one micro-batch."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, (labels != -100).sum()


@torch.no_grad()
def evaluate_lm(engine, features: list[dict], pad_id: int, batch_size: int) -> dict:
    """Token-weighted loss over the whole eval set (exact across ranks), and perplexity."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for idx, counts in eval_batches(len(features), batch_size, world_size(), rank()):
        batch = _to_device(collate_sft([features[i] for i in idx], pad_id))
        nll, n = lm_loss(engine, batch)
        if counts:
            total += torch.tensor([nll.item(), n.item()], dtype=torch.float64)
    total = strategy.all_reduce_mean(total) * world_size()
    engine.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def train_lm(engine, train_features: list[dict], eval_features: list[dict], pad_id: int, train: TrainConfig,
             ctx: StepContext, desc: str) -> dict:
    """Run the epochs (from the resumed position, if any); returns the final figures (eval loss before/after, steps,
    tokens/s, seconds)."""
    total = total_optimizer_steps(len(train_features), train)
    per_epoch = steps_per_epoch(len(train_features), train.micro_batch_size, world_size(), train.grad_accum)
    loop = ctx.resumed.get("loop", {})
    step, tokens, results = ctx.resumed.get("step", 0), loop.get("tokens", 0), dict(loop.get("results", {}))
    guard = NonFiniteGuard(train, loop.get("nonfinite_steps", 0))
    if eval_features and step == 0:
        results["eval_loss_start"] = evaluate_lm(engine, eval_features, pad_id, train.eval_batch_size)["eval_loss"]
        ctx.metrics.log({f"{desc}/eval_loss": results["eval_loss_start"]}, step=0)
    engine.train()
    train_loss, t0, tokens0 = float("nan"), time.time(), tokens  # throughput over this process's steps
    bar = progress(total, desc, initial=step)
    for epoch in range(step // per_epoch, train.epochs):
        # a resumed run re-enters its epoch at the step it stopped after: same permutation, same micro-batches
        for _, micro_indices in micro_batches(len(train_features), train.micro_batch_size, world_size(), rank(),
                                              train.grad_accum, train.seed, epoch, start_step=step - epoch * per_epoch):
            if step >= total:
                break
            losses = []
            for indices in micro_indices:
                batch = _to_device(collate_sft([train_features[i] for i in indices], pad_id))
                nll, n = lm_loss(engine, batch)
                loss = nll / n.clamp(min=1)
                guard.backward_and_step(engine, loss, step + 1, desc)  # the optimizer runs at the accumulation boundary
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
            step += 1
            train_loss = strategy.all_reduce_mean(torch.tensor(sum(losses) / len(losses))).item()
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}")
            if step % train.log_every == 0 or step == total:
                elapsed = time.time() - t0
                ctx.metrics.log(
                    {
                        f"{desc}/loss": train_loss,
                        f"{desc}/lr": engine.get_lr()[0],
                        f"{desc}/epoch": epoch,
                        f"{desc}/tokens_per_s": (tokens - tokens0) * world_size() / max(elapsed, 1e-9),
                    },
                    step=step,
                )
            if eval_features and train.eval_every and step % train.eval_every == 0 and step < total:
                ev = evaluate_lm(engine, eval_features, pad_id, train.eval_batch_size)
                ctx.metrics.log({f"{desc}/{k}": v for k, v in ev.items()}, step=step)
            ctx.checkpoint.after_step(step, lambda: {"loop": {"tokens": tokens, "results": results, "epoch": epoch,
                                                              "nonfinite_steps": guard.skipped}})
    bar.close()
    elapsed = time.time() - t0
    results.update(steps=step, train_loss=train_loss, seconds=elapsed, nonfinite_steps=guard.skipped)
    results["train_tokens_per_s"] = (tokens - tokens0) * world_size() / max(elapsed, 1e-9)
    if eval_features:
        ev = evaluate_lm(engine, eval_features, pad_id, train.eval_batch_size)
        ctx.metrics.log({f"{desc}/{k}": v for k, v in ev.items()}, step=step)
        results.update(ev)
    return results
