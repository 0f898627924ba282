"""Rule rewards to copy: checkable properties of a response, computed in Python instead of by a reward model.

Use one with PPO/GRPO (`reward.function=examples/rewards/builtin_rules.py:on_topic`). The step calls a reward
function with keyword arguments only,

    fn(prompts=[...], responses=[...], **columns) -> one finite number per response

where `columns` holds, for every other column of the prompt rows (e.g. an `answer`), the list of its values.

`on_topic` is written for the built-in task. It is a verifiable reward, not the task's hidden gold reward (which also
scores word valences no rule can see): a policy can satisfy it and still be judged mediocre by the gold reward.
"""
from __future__ import annotations

from rlhf_ds.data.builtin_task import FUNCTION_WORDS, BuiltinTask, tokenize

SUBJECT_BONUS = 1.0  # the response names the prompt's subject ("describe the red fox ." -> "fox")
FULL_STOP_BONUS = 0.5  # the response ends with " ." (the task's sentences do)
REPEAT_PENALTY = 0.5  # per extra use of a content word ("the fox runs and the fox ..." -> -0.5)


def on_topic_score(prompt: str, response: str) -> float:
    """The rule for one (prompt, response)."""
    words = tokenize(response)
    score = 0.0
    subject = BuiltinTask.subject_of(prompt)
    if subject is not None and subject in words:
        score += SUBJECT_BONUS
    if words and words[-1] == ".":
        score += FULL_STOP_BONUS
    content = [w for w in words if w not in FUNCTION_WORDS]
    return score - REPEAT_PENALTY * (len(content) - len(set(content)))


CHEERFUL = frozenset({"happy", "bright", "warm", "sweet", "calm", "gentle", "fresh", "clean", "funny", "shiny",
                      "smiles", "sings", "shines", "glows"})
GLOOMY = frozenset({"sad", "dark", "cold", "sour", "dirty", "stale", "weak", "dull", "rough", "cries", "sinks", "falls"})


def cheerful_score(prompt: str, response: str) -> float:
    """A style rule: +0.5 per distinct cheerful word, -0.5 per distinct gloomy one (at most +-1.5 in all), -0.5 per
    repeated content word (so saying "happy" twice earns nothing)."""
    words = tokenize(response)
    tone = 0.5 * (len(CHEERFUL.intersection(words)) - len(GLOOMY.intersection(words)))
    content = [w for w in words if w not in FUNCTION_WORDS]
    return max(-1.5, min(1.5, tone)) - REPEAT_PENALTY * (len(content) - len(set(content)))


def cheerful(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """Cheerful words (+0.5 each, distinct), gloomy words (-0.5 each), -0.5 per repeated content word."""
    return [cheerful_score(p, r) for p, r in zip(prompts, responses)]


def on_topic(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """Names the subject (+1), ends with a full stop (+0.5), -0.5 per repeated content word."""
    return [on_topic_score(p, r) for p, r in zip(prompts, responses)]


def names_subject(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """A verifiable 0/1 reward for the built-in task: 1.0 when the response names the prompt's subject noun
    ("describe the red fox ." -> "fox"). The built-in SFT model rarely does (a few % of sampled answers): a sparse,
    checkable signal, as a weak base meets on a verifiable task."""
    return [1.0 if BuiltinTask.subject_of(p) in tokenize(r) else 0.0 for p, r in zip(prompts, responses)]


def exact_match(prompts: list[str], responses: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 where the response is the row's `answer` column (surrounding whitespace ignored), else 0.0.

    For prompt files with a reference answer, e.g. {"prompt": "2 + 2 =", "answer": "4"}.
    """
    return [1.0 if r.strip() == a.strip() else 0.0 for r, a in zip(responses, answer)]
