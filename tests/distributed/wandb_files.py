"""Read the history of an offline W&B run from its `run-ID.wandb` file.

The file is W&B's record log: a 7-byte header (":W&B", magic, version) then
LevelDB-log framed chunks (crc32, length, type) in 32 KiB blocks, each record a
protobuf `Record`. wandb ships no Python reader, so tests use this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BLOCK_BYTES = 32768
HEADER_BYTES = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, pos = [], b"", HEADER_BYTES
    while pos + 7 <= len(data):
        if BLOCK_BYTES - pos % BLOCK_BYTES < 7:  # block trailer too small for a chunk
            pos += BLOCK_BYTES - pos % BLOCK_BYTES
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def _of_kind(run_file: Path, kind: str) -> list[Any]:
    """The records of one `record_type` (history, alert, ...) in the run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    found = []
    for raw in _records(run_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == kind:
            found.append(getattr(record, kind))
    return found


def history(run_file: Path) -> list[dict[str, Any]]:
    """Every `wandb.log` row of the run file, with `_step`."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        for h in _of_kind(run_file, "history")
    ]


def alerts(run_file: Path) -> list[dict[str, str]]:
    """Every `run.alert` of the run file: title, text and level."""
    return [
        {"title": a.title, "text": a.text, "level": a.level} for a in _of_kind(run_file, "alert")
    ]
