"""Read the records of an offline W&B run file (`run-<id>.wandb`) for tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1,
version 0), then 32 KiB blocks of chunks, each `crc32 (4) | length (2) |
type (1) | data`, types FULL=1, FIRST=2, MIDDLE=3, LAST=4; each record is a
serialized `wandb_internal_pb2.Record`. wandb 0.31 ships no reader for it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, CHUNK_HEADER = 32768, 7, 7


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, position = [], b"", HEADER
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER:  # trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER])
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_keys(path: str | Path) -> set[str]:
    """Every metric key logged to the run's history."""
    keys = set()
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def history_rows(path: str | Path) -> list[dict]:
    """Each history row of the run, as `{key: value}`."""
    import json

    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows
