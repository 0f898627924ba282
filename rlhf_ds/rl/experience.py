"""The experience maker: prompts -> rollout (n samples each) -> old and reference log-probs, values (where a critic
exists), rewards -> advantages and returns from the configured estimator. One call per RL iteration; the trainer only
consumes the `Experience` it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rlhf_ds.config import GenerationConfig, PPOAlgoConfig
from rlhf_ds.engine import strategy
from rlhf_ds.models.inputs import token_logprobs
from rlhf_ds.rewards.base import RewardBatch, WeightedReward
from rlhf_ds.rl import math as rlm
from rlhf_ds.rl.advantages import AdvantageInputs, explained_variance, get_estimator, group_stats
from rlhf_ds.rl.dynamic_sampling import Scored, fill_with_signal
from rlhf_ds.rl.shaping import ScoreShaping
from rlhf_ds.rollout.base import RolloutEngine, require_rank_local, rollout
from rlhf_ds.rollout.multi_turn import Episodes
from rlhf_ds.tracking.rollout_stats import rollout_stats


@dataclass
class Experience:
    sequences: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    prompt_len: int
    action_mask: torch.Tensor  # [B, R] float: response tokens up to and including the first EOS
    old_logp: Optional[torch.Tensor]  # None: on-policy, the update's own log-probs (detached) are the old ones
    ref_logp: torch.Tensor
    old_values: Optional[torch.Tensor]  # None without a critic
    advantages: Optional[torch.Tensor]  # None for evaluation rollouts
    returns: Optional[torch.Tensor]
    stats: dict = field(default_factory=dict)  # rank-local figures of this rollout
    prompts: list = field(default_factory=list)
    responses: list = field(default_factory=list)

    def minibatch(self, idx) -> dict:
        names = ("sequences", "attention_mask", "action_mask", "old_logp", "ref_logp", "old_values", "advantages",
                 "returns")
        return {k: getattr(self, k)[idx] for k in names if getattr(self, k) is not None}


def sequence_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float, with_entropy: bool = False, packing: bool = False, chunk_tokens: int = 0):
    """Log-probs (and entropies) of the response tokens under `model`, logits divided by the sampling temperature;
    0 at padding. `chunk_tokens`: see `token_logprobs`.

    Positions count real tokens only, so a left-padded batch gives each sequence the log-probs it has alone.
    """
    return token_logprobs(model, sequences, attention_mask, packing, temperature, prompt_len, with_entropy,
                          chunk_tokens)


def token_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 packing: bool = False) -> torch.Tensor:
    """V(state before each response token): the critic's value at the preceding position."""
    return critic(sequences, attention_mask, packing)[:, prompt_len - 1 : -1]


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class ExperienceMaker:
    """`reference` None: the actor's LoRA base (its adapters switched off) is the reference. `logit_chunks`: the
    actor's and the reference's `logit_chunk_tokens` (see `token_logprobs`)."""

    def __init__(self, engine: RolloutEngine, actor, reference, critic, reward: WeightedReward, tokenizer,
                 ppo: PPOAlgoConfig, generation: GenerationConfig, kl_controller,
                 gold_reward: Optional[Callable[[str, str], float]] = None, logit_chunks: tuple[int, int] = (0, 0),
                 episodes: Optional[Episodes] = None):
        self.engine, self.actor, self.reference, self.critic, self.reward = engine, actor, reference, critic, reward
        self.tok, self.ppo, self.gen = tokenizer, ppo, generation
        self.kl_ctl = kl_controller
        self.estimator = get_estimator(ppo.advantage_estimator)
        self.gold_reward = gold_reward
        self.actor_chunk, self.reference_chunk = logit_chunks
        self.shaping = ScoreShaping.from_config(ppo, reward.names(), generation.max_new_tokens)
        self.episodes = episodes  # multi-turn rollouts with an environment; None: single-turn
        # the config refuses the built-in collective engines by name; this catches any engine, a plugin's too
        require_rank_local(engine, [what for what, on in (("rollout.environment", episodes is not None),
                                                          ("ppo.dynamic_sampling", ppo.dynamic_sampling)) if on])

    def on_policy(self) -> bool:
        """Whether the update's own log-probs are the old ones: one epoch, one optimizer step over the whole rollout
        (no weight changes between its micro-batches) and no KL in the reward (which needs them before the update)."""
        p = self.ppo
        return (p.old_logprobs_from_update and p.ppo_epochs == 1 and self.kl_ctl.beta == 0
                and p.rollout_batch_size * p.n_samples_per_prompt == p.micro_batch_size * p.grad_accum)

    def reference_logprobs(self, seq: torch.Tensor, mask: torch.Tensor, P: int, T: float) -> torch.Tensor:
        if self.reference is None:
            with strategy.unwrap(self.actor).disable_adapter():
                return sequence_logprobs(self.actor, seq, mask, P, T, packing=self.ppo.packing,
                                         chunk_tokens=self.actor_chunk)
        return sequence_logprobs(self.reference, seq, mask, P, T, packing=self.ppo.packing,
                                 chunk_tokens=self.reference_chunk)

    @torch.no_grad()
    def _forward_all(self, seq: torch.Tensor, mask: torch.Tensor, P: int, with_old: bool):
        T = self.gen.temperature if self.gen.do_sample else 1.0
        packing = self.ppo.packing
        old, ref, values = [], [], []
        for s in _chunks(seq.shape[0], self.ppo.micro_batch_size):
            if with_old:
                old.append(sequence_logprobs(self.actor, seq[s], mask[s], P, T, packing=packing,
                                             chunk_tokens=self.actor_chunk))
            ref.append(self.reference_logprobs(seq[s], mask[s], P, T))
            if self.critic is not None:
                values.append(token_values(self.critic, seq[s], mask[s], P, packing))
        for trained in (self.actor, self.critic):
            strategy.forward_only_pass_done(trained)
        return torch.cat(old) if old else None, torch.cat(ref), torch.cat(values) if values else None

    def _scored_rollout(self, prompt_ids, prompt_texts, rows, n_samples: int,
                        group_offset: int) -> tuple[Scored, float]:
        """A rollout (from the weights of the step's sync) and its task reward; the seconds spent scoring."""
        sample = rollout if self.episodes is None else self.episodes.rollout
        batch = sample(self.engine, prompt_ids, prompt_texts, rows, self.gen, self.tok, n_samples, group_offset)
        t0 = time.time()
        task, components = self.reward(RewardBatch(batch.prompts, batch.responses, batch.rows, batch.sequences,
                                                   batch.attention_mask, batch.prompt_len, batch.env_rewards))
        return Scored(batch, task.to(batch.sequences.device, torch.float32), components), time.time() - t0

    def make(self, prompt_ids: list[list[int]], prompt_texts: list[str], rows: Optional[list[dict]] = None,
             group_offset: int = 0, train: bool = True,
             more_prompts: Optional[Callable[[], tuple[list, list, list]]] = None) -> Experience:
        """One rollout of `prompt_ids` and everything computed from it. `train=False` (held-out evaluation) samples one
        response per prompt and computes no advantages. `more_prompts` (dynamic sampling): further prompts (ids, texts,
        rows), as many as `prompt_ids`, for the rounds that replace groups without signal."""
        p = self.ppo
        n = p.n_samples_per_prompt if train else 1
        t_sync = self.engine.sync_weights()  # the one collective of generation; everything until `release` is local
        scored, t_score = self._scored_rollout(prompt_ids, prompt_texts, rows, n, group_offset)
        ds_stats = {}
        if train and more_prompts is not None:
            def more() -> Scored:
                nonlocal t_score
                extra, seconds = self._scored_rollout(*more_prompts(), n, group_offset)
                t_score += seconds
                return extra

            scored, ds_stats = fill_with_signal(scored, more, len(prompt_ids), p.dynamic_sampling_max_rounds,
                                                self.tok.pad_token_id)
        self.engine.release()
        batch, raw_scores, components = scored.batch, scored.task_reward, scored.components
        seq, attn, P = batch.sequences, batch.attention_mask, batch.prompt_len
        t1 = time.time()
        # on-policy training rollouts: the update computes the old log-probs itself (see `on_policy`)
        old_logp, ref_logp, values = self._forward_all(seq, attn, P, with_old=not (train and self.on_policy()))
        t_score += time.time() - t1

        m = batch.response_mask.float()
        scores = self.shaping(raw_scores, batch.has_eos, m.sum(1))
        # no old log-probs: beta is 0 and the update reports the KL (see `on_policy`)
        kl = torch.zeros_like(ref_logp) if old_logp is None else rlm.kl_per_token(old_logp, ref_logp, p.kl_estimator) * m
        if values is not None:
            values = values * m
        stats = {
            # the task reward (the sources' weighted sum, before clipping, penalties and KL); "reward" is its older
            # name, kept for the dashboards and summaries that read it
            "task_reward": raw_scores.mean().item(),
            "reward": raw_scores.mean().item(),
            "task_reward_std": raw_scores.std(unbiased=False).item(),
            "score_with_penalty": scores.mean().item(),
            "non_score_reward": (-self.kl_ctl.beta * kl).sum(1).mean().item(),
            "response_length": m.sum(1).mean().item(),
            "eos_rate": batch.has_eos.float().mean().item(),
            "time_generation": batch.seconds + t_sync,  # the sync included, as time_weight_sync's share of it
            "time_scoring": t_score,
            "time_weight_sync": t_sync,
            "gen_tokens": float(m.sum().item()),
        }
        if old_logp is not None:
            stats["kl"] = (rlm.kl_per_token(old_logp, ref_logp, "k1") * m).sum(1).mean().item()
        if len(components) > 1:
            stats.update({f"reward_{name}": c.float().mean().item() for name, c in components.items()})
        advantages = returns = None
        if train:
            inputs = AdvantageInputs(scores, kl, m, batch.group_ids.to(seq.device), values, self.kl_ctl.beta)
            advantages, returns = self.estimator.fn(inputs, p)
            stats["return_mean"] = rlm.masked_mean(returns, m).item()
            if p.n_samples_per_prompt > 1:
                stats.update(group_stats(raw_scores, batch.group_ids, scores))
            stats.update(ds_stats)
            if values is not None:
                stats["value_mean"] = rlm.masked_mean(values, m).item()
                stats["explained_variance"] = explained_variance(values, returns, m)
        stats.update(batch.env_stats)
        stats.update(rollout_stats(batch.responses, raw_scores.tolist(), m.sum(1).tolist()))
        if self.gold_reward is not None:
            stats["gold_reward"] = sum(self.gold_reward(q, r) for q, r in zip(batch.prompts, batch.responses)) / len(seq)
        return Experience(seq, attn, P, m, old_logp, ref_logp, values, advantages, returns, stats,
                          batch.prompts, batch.responses)
