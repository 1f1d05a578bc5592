"""Read a W&B offline run back: its history rows, for tests and ``llc-callbacks plot``.

wandb 0.30 and later ship no Python reader for run files, and ``wandb.Api`` needs the server.
Read a run once the process that wrote it has ended or called ``wandb.teardown()``:
``run.finish()`` returns before wandb-core has written the file's last 32 KiB block.
Format: a 7-byte header (b":W&B", uint16 magic 0xBEE1, uint8 version), then a LevelDB-style
log in 32 KiB blocks; each record has a 7-byte header (crc32 uint32, length uint16, type
uint8: 1 full, 2 first, 3 middle, 4 last) and a payload that is a wandb Record protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``run-*.wandb`` file, in order.

    Raises:
        ValueError: If the file is not a W&B run file.
    """
    data = Path(path).read_bytes()
    if len(data) < 7 or data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # a block's tail too short for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if offset + 7 + length > len(data):  # a record still being written: stop before it
            break
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(run_dir: Path) -> list[dict]:
    """The history rows (``wandb.log`` calls) of an offline run folder, in order.

    Raises:
        FileNotFoundError: If the folder holds no ``run-*.wandb`` file.
    """
    run_files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not run_files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run_file = run_files[0]
    rows = []
    for record in read_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def offline_run_dir(wandb_dir: Path) -> Path:
    """The single offline run folder under ``wandb_dir/wandb``."""
    (run_dir,) = Path(wandb_dir).glob("wandb/offline-run-*")
    return run_dir
