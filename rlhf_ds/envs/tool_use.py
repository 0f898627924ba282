"""`tool_use`: answer a question, calling tools on the way (the built-in multi-turn environment).

Each model turn either calls a tool (`<tool>NAME: ARGUMENTS</tool>`, envs/tools.py) and gets its result, rendered with
`observation_template`, or is the answer: the episode ends with reward 1 when the answer's last number equals the
row's `answer_column`, else 0. Per episode it reports tool calls by outcome (`info`): ok, malformed, unknown_tool,
error, timeout.

For a chat model, render the result as a turn of its template, e.g. for ChatML
`observation_template="\n<|im_start|>user\n{result}<|im_end|>\n<|im_start|>assistant\n"`; the default suits plain text.
"""
from __future__ import annotations

import re

from rlhf_ds.envs.base import ENVIRONMENTS, EnvStep
from rlhf_ds.envs.tools import STATUSES, TOOLS, find_call, run_call

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str):
    """The last number written in `text` (as a float), or None."""
    found = NUMBER.findall(text)
    return float(found[-1]) if found else None


@ENVIRONMENTS.register("tool_use")
class ToolUse:
    stop_strings = ("</tool>",)  # a call ends the model's turn: the result follows
    info_keys = ("answers", "tool_calls") + tuple(f"tool_{status}" for status in STATUSES)

    def __init__(self, tools: tuple[str, ...] | list[str] = ("calculator",), answer_column: str = "answer",
                 observation_template: str = " {result}", tool_timeout_s: float = 5.0):
        for name in tools:
            TOOLS.get(name)  # an unknown tool is a config error, said when the first environment is built
        if "{result}" not in observation_template:
            raise ValueError(f"observation_template {observation_template!r} has no {{result}} field")
        self.tools, self.answer_column = list(tools), answer_column
        self.template, self.timeout_s = observation_template, tool_timeout_s
        self.answer = None

    def reset(self, row: dict) -> None:
        if self.answer_column not in row:
            raise KeyError(f"the prompt row has no {self.answer_column!r} column (columns: {sorted(row)})")
        self.answer = float(row[self.answer_column])

    def step(self, model_turn: str) -> EnvStep:
        call = find_call(model_turn)
        if call is None:  # an answer
            given = last_number(model_turn)
            return EnvStep(reward=float(given is not None and abs(given - self.answer) < 1e-6), done=True,
                           info={"answers": 1.0})
        outcome = run_call(call, self.tools, self.timeout_s)
        return EnvStep(observation=self.template.format(result=outcome.observation),
                       info={"tool_calls": 1.0, f"tool_{outcome.status}": 1.0})
