"""Pretraining text: documents of a corpus (`read_corpus`), packed into blocks (`pack`) for step 0 and for PPO-ptx's
language-model batches (`PtxBatches`)."""
from __future__ import annotations

import numpy as np

from rlhf_ds.config import SourceConfig
from rlhf_ds.data.features import collate_sft
from rlhf_ds.data.formats import MAX_TEXT_CHARS, resample
from rlhf_ds.data.readers import DataError, read_records, read_text_documents
from rlhf_ds.utils import rank


def read_corpus(source, documents: str = "blank_line", seed: int = 0) -> list[str]:
    """Documents of a pretraining corpus, from one source or a list (paths or SourceConfig: `limit` keeps the first
    documents of a source, `weight` resamples it). A source is a plain .txt file (one document per
    blank-line-separated block, or per line with `documents="line"`), or the `text` column of anything the readers
    accept (JSONL/JSON/CSV/Parquet, a folder, save_to_disk). Refused with file and row: a missing, empty or over-long
    text, bytes that are not UTF-8, a source with no text at all."""
    texts = []
    for i, src in enumerate(source if isinstance(source, list) else [source]):
        src = src if isinstance(src, SourceConfig) else SourceConfig(path=str(src))
        if str(src.path).lower().endswith(".txt"):
            records = read_text_documents(src.path, per_line=documents == "line")
        else:
            records = read_records(src.path)
        records = records[: src.limit] if src.limit else records
        if not records:
            raise DataError("no text found (the file is empty)", file=str(src.path))
        for rec in records:
            text = rec.data.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError("missing or empty text", rec.file, rec.row, "text")
            if len(text) > MAX_TEXT_CHARS:
                raise DataError(f"text of {len(text):,} characters exceeds the {MAX_TEXT_CHARS:,}-character limit; "
                                "split long documents", rec.file, rec.row, "text")
        texts += resample([rec.data["text"] for rec in records], src.weight, seed + i)
    return texts


def pack(texts: list[str], tokenizer, block: int) -> list[dict]:
    """Concatenate BOS doc EOS ... and cut into full blocks of `block` tokens (no padding wasted)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return [{"input_ids": stream[i : i + block], "labels": stream[i : i + block]} for i in range(0, len(stream) - block + 1, block)]


class PtxBatches:
    """Packed pretraining blocks for PPO-ptx. Batch i of step t on rank r is a function of (seed, rank, t, i) alone, so a
    resumed run draws the same batches with no sampler state to save."""

    def __init__(self, cfg, tokenizer, source: str):
        self.blocks = pack(read_corpus(source, cfg.data.text_documents, cfg.train.seed), tokenizer, cfg.data.max_seq_len)
        self.size, self.seed, self.pad_id = cfg.ppo.micro_batch_size, cfg.train.seed, tokenizer.pad_token_id

    def batch(self, step: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, rank(), step, index])
        idx = rng.choice(len(self.blocks), size=self.size, replace=False)
        return collate_sft([self.blocks[i] for i in idx], self.pad_id)
