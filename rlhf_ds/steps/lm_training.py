"""Causal-LM training for step 0 (pretraining) and step 1 (SFT): next-token loss on labelled tokens, on the shared
training loop (`steps/loop.py`)."""
from __future__ import annotations

import math

import torch

from rlhf_ds.config import TrainConfig
from rlhf_ds.data.features import collate_sft
from rlhf_ds.models.inputs import token_logprobs
from rlhf_ds.steps import loop
from rlhf_ds.steps.common import StepContext


def lm_loss(engine, batch: dict, packing: bool = False, chunk_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(summed token NLL, number of labelled tokens) for one micro-batch; `chunk_tokens`: see `token_logprobs`."""
    labels = batch["labels"]
    logp = token_logprobs(engine, batch["input_ids"], batch["attention_mask"], packing, chunk_tokens=chunk_tokens,
                          labels=labels)
    nll = -torch.where(labels[:, 1:] != -100, logp, torch.zeros_like(logp)).sum()
    return nll, labelled_tokens(batch)


def labelled_tokens(batch: dict) -> int:
    """Tokens with a next-token label (the unit of the LM loss)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def evaluate_lm(engine, features: list[dict], pad_id: int, batch_size: int, packing: bool = False,
                chunk_tokens: int = 0) -> dict:
    """Token-weighted loss over the whole eval set (exact across ranks), and perplexity."""

    def sums(idx: list[int]) -> torch.Tensor:
        nll, n = lm_loss(engine, loop.to_device(collate_sft([features[i] for i in idx], pad_id)), packing, chunk_tokens)
        return torch.tensor([nll.item(), n], dtype=torch.float64)

    total = loop.eval_sums(engine, len(features), batch_size, sums)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def train_lm(engine, train_features: list[dict], eval_features: list[dict], pad_id: int, train: TrainConfig,
             ctx: StepContext, desc: str, chunk_tokens: int = 0) -> dict:
    """Next-token training of `engine` (metrics as "<desc>/..."); returns the loop's figures. `chunk_tokens`: see
    `token_logprobs`."""

    def loss(batch: dict):
        nll, n = lm_loss(engine, batch, train.packing, chunk_tokens)
        mean = nll / max(n, 1)
        return mean, {"loss": mean.item()}

    task = loop.TrainTask(
        name=desc, features=train_features, collate=lambda feats: collate_sft(feats, pad_id), loss=loss,
        count=lambda batch: int(batch["attention_mask"].sum()), weight=labelled_tokens,
        length=lambda f: len(f["input_ids"]), unit="tokens",
        evaluate=(lambda: evaluate_lm(engine, eval_features, pad_id, train.eval_batch_size, train.packing,
                                      chunk_tokens))
        if eval_features else None)
    return loop.run(engine, task, train, ctx)
