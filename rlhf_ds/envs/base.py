"""Multi-turn environments (`rollout.environment`): what the policy talks to between its turns.

An environment is built once per episode (one sampled conversation) by the factory registered under its name in
ENVIRONMENTS, called as `factory(**rollout.environment_options)` (plus `tool_timeout_s=rollout.tool_timeout_s` when the
factory takes it). The rollout (rollout/multi_turn.py) then calls

    env.reset(row)            once, with the prompt row: its columns, "prompt" (the rendered prompt text) included;
    env.step(model_turn)      after every model turn, with the turn's text; returns an `EnvStep`.

`EnvStep.observation` is text appended after the model's turn, in the model's own format (a tool result, the next
user turn): its tokens are context, never actions, so the policy loss, the KL and the value loss skip them.
`EnvStep.reward` (per turn, or only at the end) adds up into the episode's reward, the reward source "environment".
`done` ends the episode; `rollout.max_turns` and `rollout.max_total_tokens` end it too (counted as truncated).

An environment that raises, returns something other than an EnvStep, or sets no observation without ending the
episode is a bug in it, reported as EnvironmentFailure naming the environment and the prompt row (exit 1, one line).
A failing tool is not: tools report their own failures as observations (envs/tools.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

from rlhf_ds.registry import Registry

ENVIRONMENTS = Registry("environment")  # name -> factory(**options) -> Environment, one per episode


class EnvironmentFailure(RuntimeError):
    """An environment broke its contract (raised, returned a wrong type): names the environment and the row."""


@dataclass
class EnvStep:
    observation: Optional[str] = None  # text after the model's turn (None: nothing; only with done=True)
    reward: Optional[float] = None  # this turn's reward, if any
    done: bool = False  # the episode is over
    info: dict[str, float] = field(default_factory=dict)  # counts to report, summed over the rollout (env_<key>)


class Environment(Protocol):
    # optional attributes: `stop_strings` (texts that end a model turn besides EOS, e.g. "</tool>") and `info_keys`
    # (every key its EnvStep.info may hold: ranks report the same figures, env_<key>, averaged over episodes)
    def reset(self, row: dict) -> None:
        """Start an episode for this prompt row."""

    def step(self, model_turn: str) -> EnvStep:
        """The model's turn (its text, up to its end-of-turn token) -> what follows."""
