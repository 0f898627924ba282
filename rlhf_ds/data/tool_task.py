"""The built-in tool task: arithmetic about the built-in world that a small model answers right only with the
calculator (`rollout.environment=tool_use`, envs/tool_use.py).

A prompt, in the built-in task's text format, with its answer in the `answer` column:

    human : the fox has 37 stones and finds 48 more . how many stones now ? assistant :        (answer 85)

three kinds: `finds b more` (a + b), `gives b away` (a - b), `has a bags of b` (a x b), with two-digit numbers.
Prompts are split into training and held-out ones by a seeded hash of their numbers (disjoint).

SFT demonstrations (`sft_rows`) show two behaviours: a share `tool_share` calls the tool and copies its result,

    <tool>calculator: 37 + 48</tool> <result>85</result> the answer is 85 .

the rest answers at once with a guess (one of the numbers, or the result rounded to tens: right only by chance):

    the answer is 80 .

In an episode the model's call ends its turn (`</tool>` is a stop string of tool_use) and the environment appends
` <result>85</result>` (its default observation template): the demonstrations' tokens, so the model continues with
` the answer is 85 .` as it learned to (tests/test_multi_turn.py checks it token by token). Success is the share of
held-out episodes whose final answer is right (ppo/eval_task_reward); the calls' outcomes are ppo/env_tool_*.

The built-in world's pretraining corpus has no numbers, tags or tool calls, and a model pretrained on it (and its
byte-level tokenizer, trained there) learns the call format poorly from demonstrations alone; `tool_corpus.jsonl` holds
the demonstrations' text (prompt and response as one document) for a base pretrained on this kind of text
(docs/rl.md gives the recipe and what it measured).

    python -m rlhf_ds.data.tool_task OUT_DIR [--seed 0]   # tool_{train,eval,sft,corpus}.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from typing import Dict, List, Tuple

from rlhf_ds.data.builtin_task import SUBJECTS

THINGS = ("stones", "apples", "coins", "shells", "seeds", "cups")
KINDS = ("plus", "minus", "times")
SIZES = {"train": 2000, "eval": 200, "sft": 6000}


def question(kind: str, subject: str, thing: str, a: int, b: int) -> Tuple[str, int]:
    """The prompt text and its answer."""
    if kind == "plus":
        return f"human : the {subject} has {a} {thing} and finds {b} more . how many {thing} now ? assistant :", a + b
    if kind == "minus":
        return f"human : the {subject} has {a} {thing} and gives {b} away . how many {thing} now ? assistant :", a - b
    return f"human : the {subject} has {a} bags of {b} {thing} . how many {thing} in all ? assistant :", a * b


def expression(kind: str, a: int, b: int) -> str:
    return f"{a} {dict(plus='+', minus='-', times='*')[kind]} {b}"


class ToolTask:
    def __init__(self, seed: int = 0):
        self.seed = seed

    def _split(self, kind: str, a: int, b: int) -> str:
        """One in ten number triples is held out, by a seeded hash (the same on every machine)."""
        digest = hashlib.sha256(f"{self.seed}:{kind}:{a}:{b}".encode()).digest()
        return "eval" if digest[0] < 26 else "train"

    def _draw(self, rng: random.Random, split: str) -> Tuple[str, int, Tuple[str, int, int]]:
        while True:
            kind = rng.choice(KINDS)
            a = rng.randint(12, 99)
            b = rng.randint(2, 9) if kind == "times" else rng.randint(11, a - 1 if kind == "minus" else 99)
            if self._split(kind, a, b) == split:
                text, answer = question(kind, rng.choice(SUBJECTS), rng.choice(THINGS), a, b)
                return text, answer, (kind, a, b)

    def prompt_rows(self, n: int, split: str = "train") -> List[dict]:
        rng = random.Random(f"{self.seed}:prompts:{split}")
        return [{"prompt": text, "answer": answer} for text, answer, _ in (self._draw(rng, split) for _ in range(n))]

    def sft_rows(self, n: int, tool_share: float = 0.5) -> List[dict]:
        """Demonstrations on training prompts: `tool_share` of them call the calculator, the rest guess."""
        rng = random.Random(f"{self.seed}:sft")
        rows = []
        for _ in range(n):
            text, answer, (kind, a, b) = self._draw(rng, "train")
            if rng.random() < tool_share:
                response = f"<tool>calculator: {expression(kind, a, b)}</tool> <result>{answer}</result> " \
                           f"the answer is {answer} ."
            else:
                guess = rng.choice([a, b, round(answer, -1) or 10])
                response = f"the answer is {guess} ."
            rows.append({"prompt": text, "response": response})
        return rows

    def write(self, out_dir: str, sizes: Dict[str, int] | None = None, tool_share: float = 0.5) -> Dict[str, str]:
        """tool_train.jsonl and tool_eval.jsonl (prompt, answer), tool_sft.jsonl (prompt, response), tool_corpus.jsonl
        (text: the demonstrations as documents); atomic each."""
        sizes = {**SIZES, **(sizes or {})}
        os.makedirs(out_dir, exist_ok=True)
        sft = self.sft_rows(sizes["sft"], tool_share)
        files = {"train": self.prompt_rows(sizes["train"], "train"), "eval": self.prompt_rows(sizes["eval"], "eval"),
                 "sft": sft, "corpus": [{"text": r["prompt"] + r["response"]} for r in sft]}
        paths = {}
        for name, rows in files.items():
            path = os.path.join(out_dir, f"tool_{name}.jsonl")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(path + ".tmp", path)
            paths[name] = path
        return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tool-share", type=float, default=0.5, help="share of SFT demonstrations calling the tool")
    args = parser.parse_args()
    for name, path in ToolTask(args.seed).write(args.out_dir, tool_share=args.tool_share).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
