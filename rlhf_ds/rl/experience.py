"""The experience maker: prompts -> rollouts -> (old log-probs, reference log-probs, values, RM scores) -> per-token
rewards, advantages and returns. One call per PPO iteration; the trainer only consumes the `Experience` it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rlhf_ds.config import GenerationConfig, PPOAlgoConfig
from rlhf_ds.data.features import pad_batch, pair_ids
from rlhf_ds.engine import strategy
from rlhf_ds.engine.hybrid import HybridEngine, response_mask
from rlhf_ds.models.scalar_head import position_ids
from rlhf_ds.rl import math as rlm
from rlhf_ds.tracking.rollout_stats import rollout_stats


@dataclass
class Experience:
    sequences: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    prompt_len: int
    action_mask: torch.Tensor  # [B, R] float: response tokens up to and including the first EOS
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict = field(default_factory=dict)  # rank-local figures of this rollout
    prompts: list = field(default_factory=list)
    responses: list = field(default_factory=list)

    def minibatch(self, idx: slice) -> dict:
        return {k: getattr(self, k)[idx] for k in ("sequences", "attention_mask", "action_mask", "old_logp",
                                                   "ref_logp", "old_values", "advantages", "returns")}


def sequence_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float, with_entropy: bool = False):
    """Log-probs (and entropies) of the response tokens under `model`, logits divided by the sampling temperature.

    position_ids count real tokens only, so a left-padded batch gives each sequence the log-probs it has alone.
    """
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    logits = logits[:, prompt_len - 1 : -1]
    logp = rlm.logprobs_from_logits(logits, sequences[:, prompt_len:], temperature)
    if with_entropy:
        return logp, rlm.entropy_from_logits(logits, temperature)
    return logp


def token_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(state before each response token): the critic's value at the preceding position."""
    return critic(sequences, attention_mask)[:, prompt_len - 1 : -1]


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class ExperienceMaker:
    def __init__(self, hybrid: HybridEngine, actor, critic, reference, reward, tokenizer, reward_tokenizer,
                 ppo: PPOAlgoConfig, generation: GenerationConfig, max_prompt_tokens: int, kl_controller,
                 gold_reward: Optional[Callable[[str, str], float]] = None):
        self.hybrid, self.actor, self.critic, self.reference, self.reward = hybrid, actor, critic, reference, reward
        self.tok, self.rm_tok = tokenizer, reward_tokenizer
        self.same_tokenizer = tokenizer.get_vocab() == reward_tokenizer.get_vocab()
        self.ppo, self.gen = ppo, generation
        self.max_prompt_tokens = max_prompt_tokens
        self.kl_ctl = kl_controller
        self.gold_reward = gold_reward

    @torch.no_grad()
    def _forward_all(self, seq: torch.Tensor, mask: torch.Tensor, P: int):
        T = self.gen.temperature if self.gen.do_sample else 1.0
        old, ref, values, scores = [], [], [], []
        for s in _chunks(seq.shape[0], self.ppo.micro_batch_size):
            old.append(sequence_logprobs(self.actor, seq[s], mask[s], P, T))
            ref.append(sequence_logprobs(self.reference, seq[s], mask[s], P, T))
            values.append(token_values(self.critic, seq[s], mask[s], P))
            scores.append(self._scores(seq[s], mask[s], P))
        return torch.cat(old), torch.cat(ref), torch.cat(values), torch.cat(scores)

    def _scores(self, seq: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        """Normalised RM scores. With another tokenizer the texts are decoded and re-encoded for the RM."""
        rm = strategy.unwrap(self.reward)
        if self.same_tokenizer:
            return rm.normalise(self.reward_forward(seq, mask))
        prompts = self.tok.batch_decode(seq[:, :P], skip_special_tokens=True)
        responses = [self.tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(seq[:, P:], mask[:, P:])]
        # the RM's tokenizer may split the same text finer: allow it 4 tokens per generated token, within its positions
        max_len = min(4 * (self.max_prompt_tokens + self.gen.max_new_tokens),
                      getattr(rm.config, "max_position_embeddings", None) or 1 << 30)
        ids = pair_ids(self.rm_tok, prompts, responses, min(4 * self.max_prompt_tokens, max_len // 2), max_len)
        rm_seq, rm_mask = pad_batch(ids, self.rm_tok.pad_token_id, side="right")
        dev = strategy.device()
        return rm.normalise(self.reward_forward(rm_seq.to(dev), rm_mask.to(dev)))

    def reward_forward(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = self.reward(seq, mask)
        return values.gather(1, rlm.last_token_index(mask).unsqueeze(1)).squeeze(1)

    def make(self, prompt_ids: list[list[int]], prompt_texts: list[str]) -> Experience:
        g = self.gen
        ids, pmask = pad_batch(prompt_ids, self.tok.pad_token_id, side="left")
        t0 = time.time()
        out = self.hybrid.generate(ids, pmask, g.max_new_tokens, g.do_sample, g.temperature, g.top_k, g.top_p)
        t_gen = time.time() - t0
        P = out.prompt_len
        seq = out.sequences
        responses = seq[:, P:]
        if responses.shape[1] == 0:  # every rank needs at least one response position
            seq = torch.cat([seq, torch.full_like(seq[:, :1], self.tok.pad_token_id)], dim=1)
            responses = seq[:, P:]
        amask, has_eos = response_mask(responses, self.tok.eos_token_id)
        dev = seq.device
        attn = torch.cat([pmask.to(dev), amask], dim=1)

        t1 = time.time()
        old_logp, ref_logp, values, raw_scores = self._forward_all(seq, attn, P)
        t_score = time.time() - t1

        m = amask.float()
        scores = raw_scores.clone()
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        if self.ppo.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores + self.ppo.missing_eos_penalty)
        kl = rlm.kl_per_token(old_logp, ref_logp, self.ppo.kl_estimator) * m
        rewards = rlm.per_token_rewards(scores, kl, m, self.kl_ctl.beta)
        if self.ppo.whiten_rewards:
            rewards = rlm.masked_whiten(rewards, m, shift_mean=False)
        values = values * m
        advantages, returns = rlm.gae(rewards, values, m, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = rlm.masked_whiten(advantages, m)

        response_texts = [self.tok.decode(r[mm.bool()], skip_special_tokens=True) for r, mm in zip(responses, amask)]
        stats = {
            "reward": raw_scores.mean().item(),
            "score_with_penalty": scores.mean().item(),
            "kl": (rlm.kl_per_token(old_logp, ref_logp, "k1") * m).sum(1).mean().item(),
            "non_score_reward": (-self.kl_ctl.beta * kl).sum(1).mean().item(),
            "response_length": m.sum(1).mean().item(),
            "eos_rate": has_eos.float().mean().item(),
            "value_mean": rlm.masked_mean(values, m).item(),
            "return_mean": rlm.masked_mean(returns, m).item(),
            "time_generation": t_gen,
            "time_scoring": t_score,
            "time_weight_sync": out.sync_seconds,
            "gen_tokens": float(m.sum().item()),
        }
        stats.update(rollout_stats(response_texts, raw_scores.tolist(), m.sum(1).tolist()))
        if self.gold_reward is not None:
            stats["gold_reward"] = sum(self.gold_reward(p, r) for p, r in zip(prompt_texts, response_texts)) / len(prompt_texts)
        return Experience(seq, attn, P, m, old_logp, ref_logp, values, advantages, returns, stats,
                          list(prompt_texts), response_texts)
