"""A rollout backend from outside the package for tests (tests/test_elastic_resume.py names this file in `plugins`):
`replay` decodes with the built-in portable engine, and

* with $REPLAY_RECORD set to a folder, appends what each `generate` returned to `<folder>/rank<R>.jsonl`, as
  {"sync": the step's sync count, "prompt": the prompt's tokens, "response": the response's tokens};
* with $REPLAY_FROM set to such a folder, returns the recorded responses instead of sampling: a prompt at sync s
  (counted from $REPLAY_FIRST_SYNC, default 1) gets the responses recorded for it at sync s, in their order.

So a run on another world size can score exactly the rollouts of the recorded run, whichever rank drew which prompt.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from rlhf_ds.rollout.backends import BACKENDS, portable_engine
from rlhf_ds.rollout.base import GenerationOutput


class Replay:
    def __init__(self, inner, pad_token_id: int):
        self.inner, self.pad = inner, pad_token_id
        self.rank_local = getattr(inner, "rank_local", False)
        self.record, source = os.environ.get("REPLAY_RECORD"), os.environ.get("REPLAY_FROM")
        self.sync = int(os.environ.get("REPLAY_FIRST_SYNC", "1")) - 1
        self.recorded: dict[tuple, list[list[int]]] = {}
        for path in sorted(glob.glob(os.path.join(source, "rank*.jsonl"))) if source else ():
            with open(path, encoding="utf-8") as f:
                for row in map(json.loads, f):
                    self.recorded.setdefault((row["sync"], tuple(row["prompt"])), []).append(row["response"])

    def sync_weights(self) -> float:
        self.sync += 1
        return self.inner.sync_weights()  # collective: every rank syncs, replaying or not

    def release(self) -> None:
        self.inner.release()

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen) -> GenerationOutput:
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        if self.recorded:
            responses = [self.recorded[(self.sync, tuple(p))].pop(0) for p in prompts]
            width = max(len(r) for r in responses)
            tail = torch.tensor([r + [self.pad] * (width - len(r)) for r in responses], dtype=prompt_ids.dtype)
            return GenerationOutput(torch.cat([prompt_ids, tail.to(prompt_ids.device)], dim=1), prompt_ids.shape[1], 0.0)
        out = self.inner.generate(prompt_ids, prompt_mask, gen)
        if self.record:
            os.makedirs(self.record, exist_ok=True)
            with open(os.path.join(self.record, f"rank{os.environ.get('RANK', '0')}.jsonl"), "a", encoding="utf-8") as f:
                for p, r in zip(prompts, out.sequences[:, out.prompt_len:].tolist()):
                    f.write(json.dumps({"sync": self.sync, "prompt": p, "response": r}) + "\n")
        return out


@BACKENDS.register("replay")
def replay_engine(cfg, actor, tokenizer):
    return Replay(portable_engine(cfg, actor, tokenizer), tokenizer.pad_token_id)
