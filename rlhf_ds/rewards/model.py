"""The in-process reward model (`reward.model`): a ScalarHeadModel engine scoring the actor's rollouts.

With the actor's tokenizer the RM reads the actor's ids, EOS appended to a response cut at the length limit (RM
training, `rlhf-ds serve-reward` and the other-tokenizer path all end every response with EOS: scored without it, a
cut response reads as something the RM never saw). With another tokenizer the texts are decoded and re-encoded the
way RM training encoded them. Under ZeRO-3 the forward is collective: every rank must call this with
the same number of micro-batches (the PPO step gives every rank the same rollout batch size).
"""
from __future__ import annotations

import torch

from rlhf_ds.data.features import pad_batch, pair_ids
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import max_positions
from rlhf_ds.models.scalar_head import last_token_scores, reward_lengths
from rlhf_ds.rl import math as rlm
from rlhf_ds.rewards.base import RewardBatch


class ModelReward:
    name = "model"

    def __init__(self, engine, tokenizer, reward_tokenizer, micro_batch_size: int, max_prompt_tokens: int,
                 max_new_tokens: int, packing: bool = False):
        self.engine, self.packing = engine, packing
        self.tok, self.rm_tok = tokenizer, reward_tokenizer
        self.same_tokenizer = tokenizer.get_vocab() == reward_tokenizer.get_vocab()
        self.micro_batch_size = micro_batch_size
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        """Normalised RM scores of the rollouts in `batch.sequences`, [B] float32 on the CPU."""
        if batch.sequences is None or batch.attention_mask is None:
            raise ValueError("the reward model scores the actor's ids: RewardBatch.sequences and attention_mask "
                             "are needed")
        seq, mask, mb = batch.sequences, batch.attention_mask, self.micro_batch_size
        scores = [self._scores(seq[i : i + mb], mask[i : i + mb], batch.prompt_len) for i in range(0, seq.shape[0], mb)]
        return torch.cat(scores).float().cpu()

    def _scores(self, seq: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        rm = strategy.unwrap(self.engine)
        if self.same_tokenizer:
            seq, mask = ended_with_eos(seq, mask, P, self.tok.eos_token_id, self.tok.pad_token_id)
            return rm.normalise(last_token_scores(self.engine, seq, mask, self.packing))
        prompts = self.tok.batch_decode(seq[:, :P], skip_special_tokens=True)
        responses = [self.tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(seq[:, P:], mask[:, P:])]
        ids = pair_ids(self.rm_tok, prompts, responses,
                       *reward_lengths(self.max_prompt_tokens, self.max_new_tokens, max_positions(rm.config)))
        rm_seq, rm_mask = pad_batch(ids, self.rm_tok.pad_token_id, side="right")
        dev = strategy.device()
        return rm.normalise(last_token_scores(self.engine, rm_seq.to(dev), rm_mask.to(dev), self.packing))


def ended_with_eos(seq: torch.Tensor, mask: torch.Tensor, prompt_len: int, eos_token_id: int,
                   pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`seq`/`mask` with EOS after the last token of every response that has none (one column more where needed);
    rows that end with EOS are left as they are."""
    has_eos = ((seq[:, prompt_len:] == eos_token_id) & mask[:, prompt_len:].bool()).any(dim=1)
    if has_eos.all():
        return seq, mask
    seq = torch.cat([seq, torch.full_like(seq[:, :1], pad_token_id)], dim=1)
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    rows = torch.nonzero(~has_eos).squeeze(1)
    at = rlm.last_token_index(mask[rows]) + 1
    seq[rows, at] = eos_token_id
    mask[rows, at] = 1
    return seq, mask
