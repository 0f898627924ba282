"""A verifiable reward for chat checkpoints: 1 when the last number in the response equals the row's `answer`, else 0.

Used by `examples/chat_rlvr/grpo_lora.yaml` (`reward.function=examples/chat_rlvr/arithmetic_reward.py:last_number`).
The step calls it with keyword arguments only: `prompts`, `responses` and, for every other column of the prompt rows,
the list of its values (here `answer`).
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number_is(response: str, answer) -> float:
    """1.0 when the last number written in `response` equals `answer` (an int, float or numeric string), else 0.0."""
    found = NUMBER.findall(response.replace(",", ""))
    if not found:
        return 0.0
    try:
        return float(float(found[-1]) == float(answer))
    except (TypeError, ValueError):
        return 0.0


def last_number(prompts: list[str], responses: list[str], answer: list, **_) -> list[float]:
    return [last_number_is(r, a) for r, a in zip(responses, answer)]
