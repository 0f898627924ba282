"""Read users' data into plain records, with errors that point at the exact file, row and field.

Supported sources: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files, a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a folder of data files, or a hub
dataset name (``owner/name``) loaded with ``datasets.load_dataset``.

Rows are numbered from 1, as an editor numbers lines: in JSON lines (and plain-text corpora) the row is the line
number (blank lines counted), so ``row 30`` is line 30; in CSV it is the data row (the header is not a row: data row
1 is line 2 unless a quoted field spans lines, and errors give the line too); in a JSON list, Parquet file,
``save_to_disk`` folder or hub dataset it is the position, counting from 1.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Suffixes that make a missing source look like a file rather than a hub dataset name.
_FILE_LIKE_SUFFIXES = DATA_SUFFIXES + (".arrow", ".txt", ".tsv", ".gz", ".zst", ".jsonl.gz")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_KNOWN_SPLITS = ("train", "validation", "valid", "dev", "eval", "test")


class DataError(ValueError):
    """A problem in the user's data; the message says where (file, row, field) and what."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field, self.detail = file, row, field, message
        super().__init__(_locate(file, row, field) + message)

    def __reduce__(self):
        """Keep file/row/field when the error crosses process boundaries (DataLoader workers)."""
        return type(self), (self.detail, self.file, self.row, self.field)


def _locate(file: str | None, row: int | None, field: str | None) -> str:
    parts = [str(file)] if file is not None else []
    if row is not None:
        parts.append(f"row {row}")
    where = " ".join(parts)
    if field is not None:
        where = f"{where}, field {field!r}" if where else f"field {field!r}"
    return f"{where}: " if where else ""


@dataclass
class Record:
    """One raw row and where it came from, so later errors can name it."""

    file: str
    row: int  # from 1 (the module docstring says what a row is in each kind of file)
    data: dict


def read_records(source: str, split: str = "train") -> list[Record]:
    """Read every row of ``source`` (file, folder or hub name) as a :class:`Record`."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return _read_dir(path, split)
    if path.is_file():
        return _read_file(path)
    if _looks_like_path(str(source)):
        raise DataError(f"file not found (working directory: {os.getcwd()})", file=str(source))
    return _read_hub(str(source), split)


def _looks_like_path(source: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else that does not exist is a missing file."""
    return source.lower().endswith(_FILE_LIKE_SUFFIXES) or not _HUB_NAME.match(source)


def _read_file(path: Path) -> list[Record]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type {path.suffix!r}; use one of {', '.join(DATA_SUFFIXES)}", file=str(path))
    return reader(path)


def _read_text(path: Path) -> str:
    """Decode keeping bad bytes as surrogates, so they can be reported with their row and field."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def read_text_documents(source: str, per_line: bool = False) -> list[Record]:
    """A plain-text corpus: one document per block of lines separated by a blank line, or per line with ``per_line``;
    each Record is ``{"text": ...}`` with the line number (from 1) of the document's first line as its row. Bytes that
    are not UTF-8 are refused with their line as the row."""
    path = Path(os.path.expanduser(str(source)))
    if not path.is_file():
        raise DataError(f"file not found (working directory: {os.getcwd()})", file=str(source))
    records, block, first = [], [], 0
    for row, line in enumerate(_read_text(path).split("\n"), start=1):
        _check_utf8(str(path), row, None, line)
        line = line.rstrip("\r")
        if not per_line and line.strip():
            first = row if not block else first
            block.append(line)
        elif per_line and line.strip():
            records.append(Record(str(path), row, {"text": line}))
        elif block:
            records.append(Record(str(path), first, {"text": "\n".join(block)}))
            block = []
    if block:
        records.append(Record(str(path), first, {"text": "\n".join(block)}))
    return records


def _read_jsonl(path: Path) -> list[Record]:
    return _parse_lines(str(path), _read_text(path))


def _parse_lines(file: str, text: str) -> list[Record]:
    records = []
    for row, line in enumerate(text.split("\n"), start=1):  # the row is the line number
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            _check_utf8(file, row, None, line)
            raise DataError(f"malformed JSON on line {row}: {err.msg} (column {err.colno})", file=file, row=row) from None
        records.append(_make_record(file, row, value))
    return records


def _read_json(path: Path) -> list[Record]:
    """A JSON list of objects; files holding one object per line are accepted too."""
    text, file = _read_text(path), str(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(f"malformed JSON on line {err.lineno}: {err.msg} (column {err.colno})", file=file) from None
        return _parse_lines(file, text)
    if isinstance(value, list):
        return [_make_record(file, row, item) for row, item in enumerate(value, start=1)]
    if "\n" in text.strip():
        raise DataError(f"expected a list of objects or one object per line, got a JSON {type(value).__name__}", file=file)
    return _parse_lines(file, text)


def _make_record(file: str, row: int, value) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", file=file, row=row)
    for key, item in value.items():
        _check_utf8(file, row, key, item)
    return Record(file, row, value)


def _check_utf8(file: str, row: int, field: str | None, value) -> None:
    """Raise if ``value`` still holds bytes that were not valid UTF-8 (kept as surrogates)."""
    if isinstance(value, dict):
        for item in value.values():
            _check_utf8(file, row, field, item)
    elif isinstance(value, list):
        for item in value:
            _check_utf8(file, row, field, item)
    elif isinstance(value, str):
        bad = next((ch for ch in value if "\udc80" <= ch <= "\udcff"), None)
        if bad is not None:
            byte = ord(bad) - 0xDC00
            raise DataError(f"text is not valid UTF-8 (byte 0x{byte:02x}); re-save the file as UTF-8", file, row, field)


def _read_csv(path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records = []
    for row, data in enumerate(reader, start=1):  # data rows; the header is not one
        header = reader.fieldnames or []
        if None in data or None in data.values():
            found = len(header) + len(data[None]) if None in data else sum(v is not None for v in data.values())
            raise DataError(
                f"row has a different number of fields than the header: {found} instead of {len(header)} "
                f"({', '.join(header)}) (line {reader.line_num}); quote fields that contain commas",
                file=str(path), row=row,
            )
        records.append(_make_record(str(path), row, data))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"cannot read parquet file: {err}", file=str(path)) from None
    return [Record(str(path), row, data) for row, data in enumerate(rows, start=1)]


def _read_dir(path: Path, split: str) -> list[Record]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path, split)
    files = _split_files(path, _data_files(path), split)
    return [record for file in files for record in _read_file(file)]


def _read_saved(path: Path, split: str) -> list[Record]:
    """A folder from ``save_to_disk``: a Dataset, or a DatasetDict from which ``split`` is taken."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split {split!r} not found; available splits: {', '.join(loaded)}", file=str(path))
        loaded = loaded[split]
    return [Record(str(path), row, data) for row, data in enumerate(loaded.to_list(), start=1)]


def _data_files(path: Path) -> list[Path]:
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"folder has no data files ({', '.join(DATA_SUFFIXES)})", file=str(path))
    return files


def _split_files(root: Path, files: list[Path], split: str) -> list[Path]:
    """Keep only ``split``'s files when names are split-tagged (train.jsonl, test-0000.parquet, train/...)."""
    tags = {file: _split_tag(file.relative_to(root)) for file in files}
    if not any(tags.values()):
        return files
    chosen = [file for file, tag in tags.items() if tag == split]
    if not chosen:
        found = sorted({tag for tag in tags.values() if tag})
        raise DataError(f"no files for split {split!r}; files are tagged with splits: {', '.join(found)}", file=str(root))
    return chosen


def _split_tag(relative: Path) -> str | None:
    for name in (*relative.parent.parts, relative.name.split(".")[0]):
        for split in _KNOWN_SPLITS:
            if name == split or re.match(rf"^{split}[-_]", name):
                return split
    return None


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # any failure means the same thing to the user: not loadable
        raise DataError(_hub_failure(split, err), file=name) from None
    return [Record(name, row, data) for row, data in enumerate(loaded.to_list(), start=1)]


def _hub_failure(split: str, err: Exception) -> str:
    offline = any(os.environ.get(v, "").upper() in ("1", "TRUE", "YES", "ON") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    hint = (
        "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), so the hub was not contacted"
        if offline
        else "check the name and your network, or set HF_DATASETS_OFFLINE=1 when working offline"
    )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"neither a local path nor a dataset reachable on the hub (split {split!r}); {hint}. Cause: {reason}"
