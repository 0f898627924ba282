"""Tokenize normalized examples and collate them into padded tensors.

Sequences are ``[BOS] + prompt + response + [EOS]``. Pieces are tokenized with
``add_special_tokens=False`` so nothing is added twice; BOS is prepended when the tokenizer
has one and the rendered prompt does not already start with it (chat templates often
write it themselves).

Length policy: a prompt longer than ``max_prompt_tokens`` is left-truncated (its end, the
part nearest the response, is kept; BOS stays first) or dropped. The whole sequence is then
cut to ``max_seq_len`` by cutting the response; the EOS is lost in that case and the cut is
counted in ``LengthReport.response_truncated``. Since ``max_prompt_tokens < max_seq_len``,
at least one response token always survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import PromptExample, SFTExample

IGNORE_INDEX = -100


@dataclass
class LengthReport:
    """How length limits changed the data, so silent truncation can be noticed."""

    examples: int = 0
    truncated: int = 0  # prompts left-truncated to max_prompt_tokens
    dropped: int = 0  # examples dropped because their prompt was too long (prompt_overflow="drop")
    response_truncated: int = 0  # sequences cut at max_seq_len, losing their EOS
    identical: int = 0  # preference pairs dropped because cutting made chosen == rejected

    def summary(self) -> str:
        return (
            f"{self.examples} examples: {self.truncated} prompts truncated, {self.dropped} dropped, "
            f"{self.response_truncated} sequences cut at max_seq_len (no EOS), "
            f"{self.identical} pairs identical after cutting"
        )


# ---- rendering ---------------------------------------------------------------------------


def render_prompt(tokenizer, example) -> str:
    """Prompt text: plain prompts as-is, chats via the chat template or a Human/Assistant fallback."""
    messages = getattr(example, "messages", None)
    if messages is None:
        return example.prompt
    turns = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return _plain_chat(turns)


def _plain_chat(turns: list[dict]) -> str:
    """"[system]\\n\\nHuman: ...\\n\\nAssistant: ..." ending with "\\n\\nAssistant:" (rm-static style)."""
    speaker = {"user": "Human", "assistant": "Assistant"}
    text = "".join(
        turn["content"] if turn["role"] == "system" else f"\n\n{speaker[turn['role']]}: {turn['content']}"
        for turn in turns
    )
    return text + "\n\nAssistant:"


def render_response(tokenizer, example: SFTExample) -> str:
    """SFT target: ``response``, or the last assistant turn (space-led after the plain "Assistant:")."""
    if example.messages is None:
        return example.response
    content = example.messages[-1]["content"]
    return content if getattr(tokenizer, "chat_template", None) else " " + content


# ---- tokenization ------------------------------------------------------------------------


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-tokenize pieces without special tokens (one call is much faster than many)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _check_limits(tokenizer, max_prompt_tokens: int, max_seq_len: int | None, prompt_overflow: str) -> None:
    if prompt_overflow not in ("truncate", "drop"):
        raise ValueError(f"prompt_overflow must be 'truncate' or 'drop', got {prompt_overflow!r}")
    if max_prompt_tokens < 1 + (tokenizer.bos_token_id is not None):
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for prompt tokens")
    if max_seq_len is not None and max_seq_len <= max_prompt_tokens:
        raise ValueError(f"max_seq_len ({max_seq_len}) must exceed max_prompt_tokens ({max_prompt_tokens})")
    if max_seq_len is not None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one so sequences can be terminated")


def _fit_prompt(tokenizer, ids: list[int], max_prompt_tokens: int, overflow: str, report: LengthReport) -> list[int] | None:
    """Prepend BOS once and apply the prompt limit; None means the example is dropped."""
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    if head and ids[:1] == head:
        ids = ids[1:]
    budget = max_prompt_tokens - len(head)
    if len(ids) > budget:
        if overflow == "drop":
            report.dropped += 1
            return None
        report.truncated += 1
        ids = ids[len(ids) - budget:]
    return head + ids


def _complete(tokenizer, prompt: list[int], response: list[int], max_seq_len: int, report: LengthReport) -> list[int]:
    ids = prompt + response + [tokenizer.eos_token_id]
    if len(ids) > max_seq_len:
        report.response_truncated += 1
        ids = ids[:max_seq_len]
    return ids


def _prompts(tokenizer, examples, max_prompt_tokens: int, overflow: str, report: LengthReport) -> list[list[int] | None]:
    encoded = _encode(tokenizer, [render_prompt(tokenizer, ex) for ex in examples])
    return [_fit_prompt(tokenizer, ids, max_prompt_tokens, overflow, report) for ids in encoded]


def measured_lengths(tokenizer, examples) -> tuple[list[int], list[int] | None]:
    """Uncut token counts of each example: its prompt (with BOS, as the features encode it) and, for SFT examples and
    preference pairs, the whole sequence (prompt + response + EOS; a pair's longer side); None for PPO prompts."""
    report = LengthReport()
    prompts = [len(ids) for ids in _prompts(tokenizer, examples, 1 << 62, "truncate", report)]
    if not examples or isinstance(examples[0], PromptExample):
        return prompts, None
    if isinstance(examples[0], SFTExample):
        sides = [_encode(tokenizer, [render_response(tokenizer, ex) for ex in examples])]
    else:
        sides = [_encode(tokenizer, [ex.chosen for ex in examples]), _encode(tokenizer, [ex.rejected for ex in examples])]
    return prompts, [p + max(len(side[i]) for side in sides) + 1 for i, p in enumerate(prompts)]


def sft_features(
    examples, tokenizer, max_prompt_tokens: int, max_seq_len: int, prompt_overflow: str = "truncate", loss_on_prompt: bool = False
) -> tuple[list[dict], LengthReport]:
    """SFT examples -> {"input_ids", "labels"}; prompt labels are -100 unless ``loss_on_prompt``."""
    _check_limits(tokenizer, max_prompt_tokens, max_seq_len, prompt_overflow)
    report = LengthReport(examples=len(examples))
    prompts = _prompts(tokenizer, examples, max_prompt_tokens, prompt_overflow, report)
    responses = _encode(tokenizer, [render_response(tokenizer, ex) for ex in examples])
    features = []
    for prompt, response in zip(prompts, responses):
        if prompt is None:
            continue
        ids = _complete(tokenizer, prompt, response, max_seq_len, report)
        labels = list(ids) if loss_on_prompt else [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        features.append({"input_ids": ids, "labels": labels})
    return features, report


def preference_features(
    examples, tokenizer, max_prompt_tokens: int, max_seq_len: int, prompt_overflow: str = "truncate"
) -> tuple[list[dict], LengthReport]:
    """Pairs -> {"chosen_ids", "rejected_ids", "margin", "weight", "prompt_len"} (prompt + response + EOS)."""
    _check_limits(tokenizer, max_prompt_tokens, max_seq_len, prompt_overflow)
    report = LengthReport(examples=len(examples))
    prompts = _prompts(tokenizer, examples, max_prompt_tokens, prompt_overflow, report)
    chosen = _encode(tokenizer, [ex.chosen for ex in examples])
    rejected = _encode(tokenizer, [ex.rejected for ex in examples])
    features = []
    for ex, prompt, good, bad in zip(examples, prompts, chosen, rejected):
        if prompt is None:
            continue
        good = _complete(tokenizer, prompt, good, max_seq_len, report)
        bad = _complete(tokenizer, prompt, bad, max_seq_len, report)
        if good == bad:
            report.identical += 1
            continue
        features.append({"chosen_ids": good, "rejected_ids": bad, "margin": ex.margin, "weight": ex.weight, "prompt_len": len(prompt)})
    return features, report


def prompt_features(examples, tokenizer, max_prompt_tokens: int, prompt_overflow: str = "truncate") -> tuple[list[list[int]], LengthReport]:
    """PPO prompts -> token ids (BOS + prompt, within ``max_prompt_tokens``)."""
    _check_limits(tokenizer, max_prompt_tokens, None, prompt_overflow)
    report = LengthReport(examples=len(examples))
    prompts = _prompts(tokenizer, examples, max_prompt_tokens, prompt_overflow, report)
    return [ids for ids in prompts if ids is not None], report


def pair_ids(tokenizer, prompts: list[str], responses: list[str], max_prompt_tokens: int, max_seq_len: int) -> list[list[int]]:
    """(prompt, response) texts -> ids encoded exactly as reward-model training did (BOS + prompt + response + EOS).

    Used to score texts, including responses of a policy with another tokenizer (decoded, then re-encoded here).
    """
    from rlhf_ds.data.formats import SFTExample

    examples = [SFTExample(prompt=p, response=r) for p, r in zip(prompts, responses)]
    features, _ = sft_features(examples, tokenizer, max_prompt_tokens, max_seq_len, "truncate")
    return [f["input_ids"] for f in features]


# ---- collation ---------------------------------------------------------------------------


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right", pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence, or to exactly ``pad_to`` (fixed shapes); left side for generation."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    if pad_id is None:
        raise ValueError("no pad id: the tokenizer has no PAD token (rlhf_ds.models.loading.load_tokenizer adds one)")
    longest = max(map(len, seqs))
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        start = 0 if side == "right" else width - len(seq)
        ids[i, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, start:start + len(seq)] = 1
    return ids, mask


def collate_sft(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask, labels padded with -100 so padding adds no loss."""
    input_ids, attention_mask = pad_batch([f["input_ids"] for f in features], pad_id)
    labels, _ = pad_batch([f["labels"] for f in features], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pair_tokens(feature: dict) -> int:
    """Tokens of a preference example: its chosen and its rejected sequence."""
    return len(feature["chosen_ids"]) + len(feature["rejected_ids"])


def pair_weight(batch: dict) -> float:
    """What a collated preference batch's loss is a mean over: the sum of its pair weights."""
    return batch["weight"].sum().item()


def collate_preferences(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One [2B, T] batch, chosen rows first then rejected, so a single forward scores both. Features that carry
    precomputed reference log-probs (`ref_chosen`, `ref_rejected`: DPO) add them as `ref_logps` [2B], in row order."""
    seqs = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
    input_ids, attention_mask = pad_batch(seqs, pad_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "margin": torch.tensor([f["margin"] for f in features], dtype=torch.float),
        "weight": torch.tensor([f["weight"] for f in features], dtype=torch.float),
        "prompt_lens": torch.tensor([f["prompt_len"] for f in features], dtype=torch.long),
    }
    if "ref_chosen" in features[0]:
        batch["ref_logps"] = torch.tensor([f["ref_chosen"] for f in features] + [f["ref_rejected"] for f in features],
                                          dtype=torch.float64)
    return batch
