"""Multi-turn environments from outside the package (tests/test_multi_turn.py names this file in `plugins`):

* `scripted`: ends after a set number of model turns -- per rank (`turns_by_rank`, by $RANK) or per prompt row (its
  `turns` column) -- answering each turn with " obs <n> :" and a reward of `reward_per_turn`; with $ENV_EXT_RECORD set
  to a folder, each episode appends {"rank", "turns"} to `<folder>/rank<R>.jsonl`;
* `broken`: breaks its contract the way `fail_in` says: "reset" or "step" raise, "type" returns a dict from step,
  "silent" returns neither an observation nor done.
"""
from __future__ import annotations

import json
import os

from rlhf_ds.envs.base import ENVIRONMENTS, EnvStep


@ENVIRONMENTS.register("scripted")
class Scripted:
    def __init__(self, turns_by_rank: list[int] | None = None, reward_per_turn: float = 0.25):
        self.rank = int(os.environ.get("RANK", 0))
        self.by_rank = turns_by_rank
        self.reward, self.turn, self.turns = reward_per_turn, 0, 1

    def reset(self, row: dict) -> None:
        self.turns = self.by_rank[self.rank % len(self.by_rank)] if self.by_rank else int(row["turns"])

    def step(self, model_turn: str) -> EnvStep:
        self.turn += 1
        done = self.turn >= self.turns
        if done and os.environ.get("ENV_EXT_RECORD"):
            with open(os.path.join(os.environ["ENV_EXT_RECORD"], f"rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"rank": self.rank, "turns": self.turn}) + "\n")
        return EnvStep(observation=None if done else f" obs {self.turn} :", reward=self.reward, done=done)


@ENVIRONMENTS.register("broken")
class Broken:
    def __init__(self, fail_in: str = "reset"):
        self.fail_in = fail_in

    def reset(self, row: dict) -> None:
        if self.fail_in == "reset":
            raise KeyError("no column 'question'")

    def step(self, model_turn: str):
        if self.fail_in == "step":
            raise ValueError("cannot parse the turn")
        if self.fail_in == "type":
            return {"observation": "x", "done": False}
        return EnvStep(observation=None, done=False)
