"""The one training loop of the supervised steps: pretraining, SFT, the reward model and DPO.

The loop owns everything that is the same for all of them: this rank's micro-batches of a seeded permutation
(`data.batching`), gradient accumulation, the non-finite-loss guard, checkpoints and the resumed position, the eval
cadence (before training, every `train.eval_every` steps, at the end), metrics and throughput, the progress bar. A step
describes itself with a `TrainTask`: its examples, how they are collated, the loss of one micro-batch, and its
held-out evaluation.

A step's loss is the mean over all the units (labelled tokens, pairs) of its global batch, whatever the micro-batches:
each micro-batch's mean loss is weighted by its share of the step's units. So SFT is a true token mean over the step,
and a step cut into micro-batches by a token budget (`train.max_tokens_per_micro_batch`; every rank then runs as many
micro-batches as the rank that needs most, stand-ins weighted 0, because ZeRO-3 forwards are collective) has the
gradient of the same step cut by sample count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf_ds.config import TrainConfig
from rlhf_ds.data.batching import eval_batches, micro_batches, steps_per_epoch, token_budget_groups
from rlhf_ds.engine import strategy
from rlhf_ds.steps.common import StepContext, eval_count, global_batch
from rlhf_ds.tracking.metrics import progress
from rlhf_ds.utils import rank, world_size


@dataclass
class TrainTask:
    name: str  # metric prefix and progress label ("sft", "rm", "dpo")
    features: list  # training examples
    collate: Callable[[list], dict]  # examples -> a batch of CPU tensors
    # a batch (on the device) -> (the loss to backpropagate, figures of this micro-batch as floats, "loss" among them);
    # the figures are averaged over the step's micro-batches on all ranks, each weighted as its loss (`weight`), and
    # logged as "<name>/<figure>"
    loss: Callable[[dict], tuple[torch.Tensor, dict]]
    count: Callable[[dict], int]  # how many `unit`s a batch holds (throughput)
    # what the loss of a batch is a mean over (labelled tokens, pair weights): a micro-batch's share of the step
    weight: Callable[[dict], float]
    length: Callable[[dict], int]  # tokens of one example (token-budget micro-batches)
    unit: str = "tokens"
    evaluate: Optional[Callable[[], dict]] = None  # held-out figures (collective: every rank calls it)
    what: str = ""  # names the loss in non-finite-loss messages (default: name)
    postfix: tuple = ("loss",)  # figures shown on the progress bar


def total_optimizer_steps(n_train: int, train: TrainConfig) -> int:
    """Optimizer steps of the run; the steps call it (or split_eval, which checks the same) before any model loads."""
    per_epoch = steps_per_epoch(n_train, train.micro_batch_size, world_size(), train.grad_accum)
    if per_epoch == 0:
        eval_count(n_train, 0, batch=global_batch(train))  # raises the DataError that names the batch keys
    total = per_epoch * train.epochs
    return min(total, train.max_steps) if train.max_steps else total


def step_batches(task: TrainTask, micro: list[list[int]], max_tokens: int) -> tuple[list[tuple[dict, bool]], bool]:
    """This rank's collated micro-batches of one step as (batch, counted), and whether a token budget cut them.

    Under a budget the step's examples are regrouped into micro-batches of at most `max_tokens` tokens, and every rank
    runs as many as the rank needing most: the missing ones are stand-ins (its first example, not counted)."""
    if not max_tokens:
        return [(task.collate([task.features[i] for i in indices]), True) for indices in micro], False
    indices = [i for m in micro for i in m]
    groups = token_budget_groups(indices, {i: task.length(task.features[i]) for i in indices}, max_tokens)
    most = int(strategy.all_reduce_max(torch.tensor(float(len(groups)))).item())
    batches = [(task.collate([task.features[i] for i in g]), True) for g in groups]
    if most > len(groups):
        batches += [(task.collate([task.features[indices[0]]]), False)] * (most - len(groups))
    return batches, True


def to_device(batch: dict) -> dict:
    dev = strategy.device()
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def eval_sums(engine, n_items: int, batch_size: int, sums_of: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """The sum over a whole evaluation set of `sums_of(indices)` (a vector of per-batch sums), the same on every rank.

    Each rank takes its share in batches (`data.batching.eval_batches`: equal batch counts on every rank, because a
    ZeRO-3 forward is collective); a stand-in batch of a rank out of items is computed and not counted. The sums are
    accumulated in float64, so the result does not depend on how the set was split over ranks beyond rounding."""
    engine.eval()
    total: Optional[torch.Tensor] = None
    for idx, counts in eval_batches(n_items, batch_size, world_size(), rank()):
        sums = sums_of(idx).detach().to("cpu", torch.float64)
        total = torch.zeros_like(sums) if total is None else total
        if counts:
            total += sums
    strategy.forward_only_pass_done(engine)
    engine.train()
    if total is None:
        raise ValueError("the evaluation set is empty")
    return strategy.all_reduce_mean(total) * world_size()


def run(engine, task: TrainTask, train: TrainConfig, ctx: StepContext) -> dict:
    """Train `engine` on `task` for the configured epochs/steps (from the resumed position, if any); returns the
    figures: held-out ones before (`<figure>_start`) and after, steps, last train loss, throughput, seconds."""
    n = len(task.features)
    total = total_optimizer_steps(n, train)
    per_epoch = steps_per_epoch(n, train.micro_batch_size, world_size(), train.grad_accum)
    step, state, guard = ctx.resumed.get("step", 0), ctx.loop_state, ctx.guard
    done, results = state.get("count", 0), state.setdefault("results", {})
    name = task.name

    def evaluate(at: int) -> dict:
        figures = task.evaluate()
        ctx.metrics.log({f"{name}/{k}": v for k, v in figures.items()}, step=at)
        return figures

    if task.evaluate is not None and step == 0:
        results.update({f"{k}_start": v for k, v in evaluate(0).items()})
    engine.train()
    figures, t0, done0 = {"loss": float("nan")}, time.time(), done  # throughput over this process's steps
    bar = progress(total, name, initial=step)
    for epoch in range(step // per_epoch, train.epochs):
        # a resumed run re-enters its epoch at the step it stopped after: same permutation, same micro-batches
        for _, micro in micro_batches(n, train.micro_batch_size, world_size(), rank(), train.grad_accum, train.seed,
                                      epoch, start_step=step - epoch * per_epoch):
            if step >= total:
                break
            batches, budgeted = step_batches(task, micro, train.max_tokens_per_micro_batch)
            weights = [task.weight(b) if counted else 0.0 for b, counted in batches]
            total_weight = strategy.all_reduce_sum(torch.tensor(sum(weights), dtype=torch.float64)).item()
            # DeepSpeed divides each backward by its accumulation steps and averages gradients over ranks
            scale = world_size() * strategy.gradient_accumulation_steps(engine) / max(total_weight, 1e-12)
            sums: dict[str, float] = {}
            for j, ((batch, counted), w) in enumerate(zip(batches, weights)):
                if budgeted:
                    strategy.set_accumulation_boundary(engine, j == len(batches) - 1)
                loss, stats = task.loss(to_device(batch))
                # optimizer at the boundary
                guard.backward_and_step(engine, loss * (w * scale), step + 1, task.what or name)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * w
                done += task.count(batch) if counted else 0
            step += 1
            figures = dict(zip(sums, (strategy.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
                                      / max(total_weight, 1e-12)).tolist()))
            # which examples the step took, on any number of ranks: the sums of (index + 1) and its square over the
            # global batch (a resume on another world size must take the same ones)
            ids = torch.tensor([i + 1 for indices in micro for i in indices], dtype=torch.float64)
            taken = strategy.all_reduce_sum(torch.stack([ids.sum(), ids.square().sum()])).tolist()
            figures.update(example_id_sum=taken[0], example_id_sq_sum=taken[1])
            if budgeted:
                figures["micro_batches"] = len(batches)  # per rank, stand-ins included
            bar.update(1)
            bar.set_postfix({k: f"{figures[k]:.4f}" for k in task.postfix if k in figures})
            if step % train.log_every == 0 or step == total:
                elapsed = time.time() - t0
                ctx.metrics.log({**{f"{name}/{k}": v for k, v in figures.items()}, f"{name}/lr": engine.get_lr()[0],
                                 f"{name}/epoch": epoch,
                                 f"{name}/{task.unit}_per_s": (done - done0) * world_size() / max(elapsed, 1e-9)},
                                step=step)
            if task.evaluate is not None and train.eval_every and step % train.eval_every == 0 and step < total:
                evaluate(step)
            state["count"] = done
            ctx.checkpoint.after_step(step)
    bar.close()
    elapsed = time.time() - t0
    results.update(steps=step, train_loss=figures["loss"], seconds=elapsed, nonfinite_steps=guard.skipped)
    results[f"train_{task.unit}_per_s"] = (done - done0) * world_size() / max(elapsed, 1e-9)
    if task.evaluate is not None:
        results.update(evaluate(step))
    return results
