"""Multi-turn episodes (`rollout.environment`): the policy and an environment take turns, rank-local.

Per turn, every episode still running decodes its next model turn in one batched `engine.generate` call (the
weights of the step's `sync_weights`), up to its end-of-turn token (EOS) or `generation.max_new_tokens`, or right
after the first of the environment's `stop_strings` (e.g. "</tool>"), as a stop condition of decoding would; the
environment (envs/base.py) answers each turn with an observation, a reward and whether the episode is over. An
episode ends when its environment says done, after `max_turns` model turns, or when its response side (model and
environment tokens after the prompt) reaches `max_total_tokens`. No collective is entered: ranks whose episodes take
different numbers of turns never wait for each other.

The result is a `RolloutBatch` like a single-turn rollout's, with the environment's tokens inside the response:
`attention_mask` is 1 on them (they are context) and `action_mask` 0 (they are not the policy's choices), so the log
probabilities, the KL and the losses of the update skip them; an EOS the environment inserts to close a turn cut at
the token budget counts as the environment's. `env_rewards` holds each episode's summed rewards.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_ds.config import GenerationConfig
from rlhf_ds.data.features import pad_batch
from rlhf_ds.envs.base import ENVIRONMENTS, EnvironmentFailure, EnvStep
from rlhf_ds.rollout.base import RolloutBatch, RolloutEngine, expand_prompts

log = logging.getLogger("rlhf_ds")


@dataclass
class EpisodeLimits:
    max_turns: int  # model turns per episode
    max_total_tokens: int  # response-side tokens (model and environment) per episode


@dataclass
class Episodes:
    """Step 3's multi-turn rollouts: which environment, built how, within which limits (the `rollout` config)."""

    name: str
    make_env: Callable[[], object]  # one environment per episode
    limits: EpisodeLimits

    @classmethod
    def from_config(cls, cfg) -> "Episodes | None":
        """None for single-turn rollouts (no rollout.environment). The factory gets rollout.environment_options, and
        `tool_timeout_s` where it takes one."""
        ro = cfg.rollout
        if ro.environment is None:
            return None
        factory = ENVIRONMENTS.get(ro.environment)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        extra = {"tool_timeout_s": ro.tool_timeout_s} if "tool_timeout_s" in params else {}
        options = {**ro.environment_options, **extra}
        return cls(ro.environment, lambda: factory(**options), EpisodeLimits(ro.max_turns, cfg.response_tokens()))

    def rollout(self, engine: RolloutEngine, prompt_ids, prompts, rows, gen: GenerationConfig, tokenizer,
                n_samples: int = 1, group_offset: int = 0) -> RolloutBatch:
        return multi_turn_rollout(engine, self.name, self.make_env, prompt_ids, prompts, rows, gen, tokenizer,
                                  self.limits, n_samples, group_offset)


def _row_label(row: dict, prompt: str) -> str:
    where = row.get("id", row.get("row"))
    preview = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f"prompt row {where!r} ({preview!r})" if where is not None else f"prompt row {preview!r}"


class _Episode:
    """One conversation: its environment, the response-side tokens and which of them are the policy's."""

    def __init__(self, name: str, make_env: Callable[[], object], row: dict, prompt: str):
        self.name, self.label = name, _row_label(row, prompt)
        self.env = self._call("building", make_env)
        self._call("reset", self.env.reset, {**row, "prompt": prompt})
        self.tokens: list[int] = []
        self.actions: list[int] = []
        self.reward, self.turns, self.has_eos, self.stopped, self.end = 0.0, 0, False, False, ""
        self.info_keys = tuple(getattr(self.env, "info_keys", ()))
        self.stop_strings = tuple(getattr(self.env, "stop_strings", ()))
        self.info = dict.fromkeys(self.info_keys, 0.0)

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise EnvironmentFailure(f"environment {self.name!r} raised in {what} on {self.label}: "
                                     f"{type(e).__name__}: {e}") from e

    def step(self, text: str) -> EnvStep:
        out = self._call("step", self.env.step, text)
        if not isinstance(out, EnvStep):
            raise EnvironmentFailure(f"environment {self.name!r}: step returned {type(out).__name__} on {self.label}; "
                                     "expected rlhf_ds.envs.base.EnvStep(observation, reward, done)")
        if out.reward is not None:
            number = isinstance(out.reward, (int, float)) and not isinstance(out.reward, bool)
            if not number or not math.isfinite(out.reward):
                raise EnvironmentFailure(f"environment {self.name!r}: reward {out.reward!r} on {self.label} is not a "
                                         "finite number")
            self.reward += float(out.reward)
        if not out.done and not isinstance(out.observation, str):
            raise EnvironmentFailure(f"environment {self.name!r}: step on {self.label} neither ended the episode "
                                     f"(done=True) nor gave an observation (text), got {out.observation!r}")
        for key, value in out.info.items():
            if key not in self.info:  # every rank must report the same figures: they are averaged key by key
                raise EnvironmentFailure(f"environment {self.name!r}: info key {key!r} on {self.label} is not among "
                                         f"its info_keys {self.info_keys} (declare every key it reports)")
            self.info[key] += float(value)
        return out

    def end_of_turn(self, response: list[int], eos: int, tokenizer) -> list[int]:
        """The model's turn in `response`: up to its first EOS, or to the end of the first stop string of the
        environment (as if decoding had stopped there: the tokens kept are the ones sampled)."""
        self.has_eos = eos in response
        if self.has_eos:
            response = response[: response.index(eos) + 1]
        self.stopped = False

        def stops(tokens: list[int]) -> bool:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            return any(stop in text for stop in self.stop_strings)

        if self.stop_strings and stops(response):
            k = next(k for k in range(1, len(response) + 1) if stops(response[:k]))  # the shortest prefix that stops
            response, self.stopped = response[:k], True
            self.has_eos = eos in response
        return response

    def add(self, tokens: list[int], action: int) -> None:
        self.tokens += tokens
        self.actions += [action] * len(tokens)


def multi_turn_rollout(engine: RolloutEngine, env_name: str, make_env: Callable[[], object],
                       prompt_ids: list[list[int]], prompts: list[str], rows: list[dict], gen: GenerationConfig,
                       tokenizer, limits: EpisodeLimits, n_samples: int = 1, group_offset: int = 0) -> RolloutBatch:
    """`n_samples` episodes per prompt (one group id per prompt, as `rollout`). Sampling draws from torch's global
    generator, turn after turn: seeded, a rank's episodes are reproducible."""
    ids, texts, rows, group_ids = expand_prompts(prompt_ids, prompts, rows, n_samples, group_offset)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    episodes = [_Episode(env_name, make_env, row, text) for row, text in zip(rows, texts)]
    active, seconds = list(range(len(episodes))), 0.0
    for turn in range(limits.max_turns):
        if not active:
            break
        room = [limits.max_total_tokens - len(episodes[i].tokens) for i in active]
        batch_ids, batch_mask = pad_batch([ids[i] + episodes[i].tokens for i in active], pad, side="left")
        out = engine.generate(batch_ids, batch_mask, dataclasses.replace(gen, max_new_tokens=min(gen.max_new_tokens,
                                                                                                  max(room))))
        seconds += out.seconds
        responses = out.sequences[:, out.prompt_len:].tolist()
        t0 = time.time()
        still = []
        for i, left, response in zip(active, room, responses):
            ep = episodes[i]
            response = ep.end_of_turn(response[:left], eos, tokenizer)
            ep.add(response, 1)
            ep.turns += 1
            step = ep.step(tokenizer.decode(response, skip_special_tokens=True))
            if step.done:
                ep.end = "done"
                continue
            if turn == limits.max_turns - 1:
                ep.end = "max_turns"
                continue
            closing = [] if ep.has_eos or ep.stopped else [eos]  # the turn was cut: the environment closes it
            ep.add((closing + tokenizer.encode(step.observation, add_special_tokens=False))[: left - len(response)], 0)
            if len(ep.tokens) >= limits.max_total_tokens:
                ep.end = "max_total_tokens"
                continue
            still.append(i)
        active = still
        seconds += time.time() - t0
    unfinished = [ep for ep in episodes if ep.end == "max_turns"]
    if unfinished:  # an environment that never says done: the figure env_max_turns_rate counts it every step
        log.warning("environment %r: %d of %d episodes reached rollout.max_turns=%d without ending (first: %s); they "
                    "are scored as they stand", env_name, len(unfinished), len(episodes), limits.max_turns,
                    unfinished[0].label)
    return _as_batch(episodes, ids, texts, rows, group_ids, tokenizer, seconds)


def _as_batch(episodes: list[_Episode], ids: list[list[int]], texts: list[str], rows: list[dict],
              group_ids: torch.Tensor, tokenizer, seconds: float) -> RolloutBatch:
    """Prompts left-padded, response sides right-padded (at least one column, as `with_response_column`)."""
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = pad_batch(ids, pad, side="left")
    width = max(1, max(len(ep.tokens) for ep in episodes))
    tokens = torch.full((len(episodes), width), pad, dtype=torch.long)
    attention = torch.zeros_like(tokens)
    action = torch.zeros_like(tokens)
    for row, ep in enumerate(episodes):
        n = len(ep.tokens)
        tokens[row, :n] = torch.tensor(ep.tokens, dtype=torch.long)
        attention[row, :n] = 1
        action[row, :n] = torch.tensor(ep.actions, dtype=torch.long)
    responses = [tokenizer.decode(ep.tokens, skip_special_tokens=True) for ep in episodes]
    info_keys = episodes[0].info_keys
    stats = {"env_turns": sum(ep.turns for ep in episodes) / len(episodes),
             "env_done_rate": sum(ep.end == "done" for ep in episodes) / len(episodes),
             "env_max_turns_rate": sum(ep.end == "max_turns" for ep in episodes) / len(episodes),
             "env_max_total_tokens_rate": sum(ep.end == "max_total_tokens" for ep in episodes) / len(episodes),
             "env_tokens": sum(a == 0 for ep in episodes for a in ep.actions) / len(episodes)}
    stats.update({f"env_{k}": sum(ep.info.get(k, 0.0) for ep in episodes) / len(episodes) for k in info_keys})
    batch = RolloutBatch(torch.cat([prompt_ids, tokens], dim=1), torch.cat([prompt_mask, attention], dim=1),
                         torch.cat([torch.zeros_like(prompt_mask), action], dim=1), prompt_ids.shape[1], group_ids,
                         torch.tensor([ep.has_eos for ep in episodes]), texts, responses, rows, seconds)
    batch.env_rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
    batch.env_stats = stats
    return batch
