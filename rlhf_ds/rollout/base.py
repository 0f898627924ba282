"""What every rollout engine shares: the batch it returns, the one Hugging Face `generate` call, the response mask.

A rollout engine (this package, one file each) has three calls (`RolloutEngine`): `sync_weights()` once per step,
collective, copies the trained actor's weights into its generation model (`engine.params.iter_full_params`);
`generate(prompt_ids, prompt_mask, gen) -> GenerationOutput` decodes left-padded prompts with those weights, as often
as the step needs (more turns, more sampling rounds), and on a rank-local engine never enters a collective, so ranks
may call it different numbers of times; `release()` ends the step's generation (frees the copy unless kept).
Everything around it -- n samples per prompt, group ids, the action mask, decoding the texts -- is `rollout` below,
written once; multi-turn episodes are `rollout/multi_turn.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rlhf_ds.config import ConfigError, GenerationConfig
from rlhf_ds.data.features import pad_batch


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, P + R]: left-padded prompts, then responses (pads after the first EOS)
    prompt_len: int  # P
    seconds: float


class RolloutEngine(Protocol):
    # False: `generate` is collective too (a tensor-parallel group, DeepSpeed's hybrid engine): every rank must call it
    # the same number of times, so multi-turn episodes and dynamic sampling refuse such an engine
    rank_local: bool

    def sync_weights(self) -> float:
        """Collective: the actor's current weights into the generation model. Returns the seconds it took."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationConfig) -> GenerationOutput:
        """Responses to left-padded prompts from the weights of the last `sync_weights`."""

    def release(self) -> None:
        """The step's generation is over: free what is not kept between steps (hybrid.keep_copy)."""


def require_rank_local(engine: RolloutEngine, needs: list[str]) -> None:
    """ConfigError when what `needs` names (multi-turn episodes, dynamic sampling: ranks call `generate` different
    numbers of times) meets an engine whose `generate` is collective, or that does not say (a plugin's backend)."""
    if needs and not getattr(engine, "rank_local", False):
        raise ConfigError(f"{' and '.join(needs)} call the rollout engine a different number of times on each rank, "
                          f"but {type(engine).__name__} does not decode rank-locally (rank_local is not True)")


@dataclass
class RolloutBatch:
    sequences: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]: real prompt tokens and the response up to its first EOS
    action_mask: torch.Tensor  # [B, P + R] long: 1 on the tokens the policy chose (the response up to its first EOS)
    prompt_len: int  # P: the responses start at this column
    group_ids: torch.Tensor  # [B]: the responses to one prompt share an id (group baselines); unique within a step
    has_eos: torch.Tensor  # [B] bool
    prompts: list[str]
    responses: list[str]
    rows: list[dict] = field(default_factory=list)  # the prompt rows' other columns (reference answers, ...)
    seconds: float = 0.0
    # multi-turn episodes (rollout/multi_turn.py): each one's summed environment rewards [B], and their figures
    env_rewards: torch.Tensor | None = None
    env_stats: dict = field(default_factory=dict)

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, R]: the action mask over the response columns (0 on environment tokens between model turns)."""
        return self.action_mask[:, self.prompt_len :]


def sampling_kwargs(gen: GenerationConfig, pad_token_id: int, eos_token_id: int, max_new_tokens: int) -> dict:
    """The keyword arguments of every Hugging Face `generate` call (training rollouts and evaluation alike)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=gen.do_sample, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id, use_cache=True)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_k=gen.top_k or None, top_p=gen.top_p)
    return kwargs


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of response tokens up to and including the first EOS, and whether each response has an EOS.

    Tokens after the first EOS are padding: masked out of rewards, values and losses.
    """
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_first_eos).long(), has_eos


def with_response_column(sequences: torch.Tensor, prompt_len: int, pad_token_id: int) -> torch.Tensor:
    """Every batch gets at least one response position (a batch where all prompts end at once has none), so that
    every rank runs the same scoring and training code."""
    if sequences.shape[1] > prompt_len:
        return sequences
    return torch.cat([sequences, torch.full_like(sequences[:, :1], pad_token_id)], dim=1)


def expand_prompts(prompt_ids: list[list[int]], prompts: list[str], rows: list[dict] | None, n_samples: int,
                   group_offset: int) -> tuple[list[list[int]], list[str], list[dict], torch.Tensor]:
    """Each prompt `n_samples` times, side by side, with its group id (`group_offset` + the prompt's index)."""
    ids = [p for p in prompt_ids for _ in range(n_samples)]
    texts = [p for p in prompts for _ in range(n_samples)]
    rows = [r for r in (rows or [{}] * len(prompts)) for _ in range(n_samples)]
    group_ids = torch.arange(group_offset, group_offset + len(prompt_ids)).repeat_interleave(n_samples)
    return ids, texts, rows, group_ids


def rollout(engine: RolloutEngine, prompt_ids: list[list[int]], prompts: list[str], rows: list[dict],
            gen: GenerationConfig, tokenizer, n_samples: int = 1, group_offset: int = 0) -> RolloutBatch:
    """`n_samples` responses to each prompt, the samples of one prompt next to each other with one group id
    (`group_offset` + the prompt's index), from the weights of the engine's last sync. Sampling draws from torch's
    global generator: seed it first."""
    ids, texts, rows, group_ids = expand_prompts(prompt_ids, prompts, rows, n_samples, group_offset)
    padded, pmask = pad_batch(ids, tokenizer.pad_token_id, side="left")
    out = engine.generate(padded, pmask, gen)
    P = out.prompt_len
    seq = with_response_column(out.sequences, P, tokenizer.pad_token_id)
    rmask, has_eos = response_mask(seq[:, P:], tokenizer.eos_token_id)
    dev = seq.device
    attention = torch.cat([pmask.to(dev), rmask], dim=1)
    action = torch.cat([torch.zeros_like(pmask).to(dev), rmask], dim=1)
    t0 = time.time()
    responses = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(seq[:, P:], rmask)]
    return RolloutBatch(seq, attention, action, P, group_ids, has_eos, texts, responses, rows,
                        out.seconds + time.time() - t0)


def select_samples(batch: RolloutBatch, index: list[int]) -> RolloutBatch:
    """The samples `index` of `batch`, in that order (same columns)."""
    idx = torch.tensor(index, dtype=torch.long)
    return RolloutBatch(batch.sequences[idx], batch.attention_mask[idx], batch.action_mask[idx], batch.prompt_len,
                        batch.group_ids[idx], batch.has_eos[idx], [batch.prompts[i] for i in index],
                        [batch.responses[i] for i in index], [batch.rows[i] for i in index],
                        batch.seconds, None if batch.env_rewards is None else batch.env_rewards[idx], batch.env_stats)


def concat_batches(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """One batch of the samples of `batches`, in order: prompts left-padded and responses right-padded to the widest
    (padding is masked out of attention and actions, as any padding). Seconds add up; environment figures are the
    first batch's."""
    P = max(b.prompt_len for b in batches)
    R = max(b.sequences.shape[1] - b.prompt_len for b in batches)

    def widen(t: torch.Tensor, b: RolloutBatch, value: int) -> torch.Tensor:
        left, right = P - b.prompt_len, R - (t.shape[1] - b.prompt_len)
        return torch.nn.functional.pad(t, (left, right), value=value)

    env_rewards = None if batches[0].env_rewards is None else torch.cat([b.env_rewards for b in batches])
    return RolloutBatch(torch.cat([widen(b.sequences, b, pad_token_id) for b in batches]),
                        torch.cat([widen(b.attention_mask, b, 0) for b in batches]),
                        torch.cat([widen(b.action_mask, b, 0) for b in batches]), P,
                        torch.cat([b.group_ids for b in batches]), torch.cat([b.has_eos for b in batches]),
                        [p for b in batches for p in b.prompts], [r for b in batches for r in b.responses],
                        [r for b in batches for r in b.rows], sum(b.seconds for b in batches), env_rewards,
                        batches[0].env_stats)
