"""Score shaping: what is added to the task reward (the reward sources' weighted sum) before the advantages.

Three terms, each off unless the config or its `auto` default turns it on:
- `score_clip`: the task reward clipped to +-score_clip;
- the missing-EOS penalty: a constant added to responses that never end. `auto` (the default) chooses it from the
  reward: -1 for a reward model alone (InstructGPT / DeepSpeed-Chat; unbounded RM scores of order 1), none when a
  function or a server scores: with a 0/1 verifiable reward a -1 penalty is the largest term, and from a weak base
  (every answer wrong) it is the only difference inside a group, so the update would learn only to stop early. TRL,
  verl and OpenRLHF apply no such penalty to reward functions by default;
- DAPO's overlong shaping (opt-in, `overlong_buffer` > 0): a response longer than max_new_tokens - buffer tokens loses
  factor x excess / buffer, reaching the whole factor at max_new_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment per response: 0 up to max_new_tokens - buffer tokens, then
    -factor x (length - (max_new_tokens - buffer)) / buffer, i.e. -factor at max_new_tokens. `buffer` 0: zeros."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    excess = lengths.to(torch.float32) - (max_new_tokens - buffer)
    return -factor * excess.clamp(min=0) / buffer


def default_missing_eos_penalty(sources: list[str], overlong_buffer: int) -> Optional[float]:
    """`ppo.missing_eos_penalty=auto`: -1 for a reward model alone, none when a function or a server scores or when
    overlong shaping replaces it."""
    return -1.0 if sources == ["model"] and overlong_buffer == 0 else None


@dataclass(frozen=True)
class ScoreShaping:
    score_clip: Optional[float]
    missing_eos_penalty: Optional[float]
    overlong_buffer: int
    overlong_penalty_factor: float
    max_new_tokens: int

    @classmethod
    def from_config(cls, ppo, sources: list[str], max_new_tokens: int) -> "ScoreShaping":
        penalty = ppo.missing_eos_penalty
        if penalty == "auto":
            penalty = default_missing_eos_penalty(sources, ppo.overlong_buffer)
        return cls(ppo.score_clip, penalty, ppo.overlong_buffer, ppo.overlong_penalty_factor, max_new_tokens)

    def __call__(self, task_reward: torch.Tensor, has_eos: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The scores the advantages see: the task reward clipped, plus the penalties."""
        scores = task_reward.clone()
        if self.score_clip is not None:
            scores = scores.clamp(-self.score_clip, self.score_clip)
        if self.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores + self.missing_eos_penalty)
        if self.overlong_buffer > 0:
            scores = scores + overlong_penalty(lengths, self.max_new_tokens, self.overlong_buffer,
                                               self.overlong_penalty_factor).to(scores.device)
        return scores

    def describe(self) -> str:
        parts = [f"missing-EOS penalty {self.missing_eos_penalty}" if self.missing_eos_penalty is not None
                 else "no missing-EOS penalty"]
        if self.overlong_buffer > 0:
            parts.append(f"overlong shaping: -{self.overlong_penalty_factor:g} x excess / {self.overlong_buffer} "
                         f"beyond {self.max_new_tokens - self.overlong_buffer} tokens")
        if self.score_clip is not None:
            parts.append(f"task reward clipped to +-{self.score_clip:g}")
        return ", ".join(parts)
