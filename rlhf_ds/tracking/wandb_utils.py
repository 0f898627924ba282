"""Reading what wandb wrote offline (`WANDB_MODE=offline`), without a server: `<dir>/wandb/offline-run-*/run-*.wandb`.

The `.wandb` file is wandb's transaction log: a 7-byte header (":W&B", magic, version) then LevelDB-log framing —
32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full/first/middle/last), each whole record a protobuf
`Record` (run, config, history, summary, ...). wandb >= 0.2x no longer ships a Python reader, so this is a small one:
enough to check that a run holds the logged metrics, or to look at an offline run before `wandb sync`.
"""
from __future__ import annotations

import glob
import json
import os
import struct

_HEADER = 7
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_runs(root: str) -> list[str]:
    """The `.wandb` files of every offline run under `root` (searched recursively), oldest first."""
    files = glob.glob(os.path.join(root, "**", "offline-run-*", "run-*.wandb"), recursive=True)
    return sorted(files, key=lambda f: os.path.basename(os.path.dirname(f)))


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb transaction log (no ':W&B' header)")
    out, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero fill (pre-allocated or padded block)
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(path: str) -> dict:
    """{"run": {project, group, name, job_type}, "config": {...}, "history": [{...}], "summary": {...}} of one run.

    `path` is a `.wandb` file or an `offline-run-*` folder. Values come back JSON-decoded; the summary is the last
    value of each key (explicit summary updates included).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "run-*.wandb"))
        if not found:
            raise FileNotFoundError(f"no run-*.wandb in {path}")
        path = found[0]
    with open(path, "rb") as f:
        data = f.read()
    out: dict = {"run": {}, "config": {}, "history": [], "summary": {}}
    for raw in _records(data):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"project": r.project, "group": r.run_group, "name": r.display_name, "job_type": r.job_type,
                          "id": r.run_id, "tags": list(r.tags)}
            out["config"].update({_key(i): _value(i.value_json) for i in r.config.update if _key(i) != "_wandb"})
        elif kind == "config":
            out["config"].update({_key(i): _value(i.value_json) for i in rec.config.update if _key(i) != "_wandb"})
        elif kind == "history":
            out["history"].append({_key(i): _value(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): _value(i.value_json) for i in rec.summary.update})
    return out
