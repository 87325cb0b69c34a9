"""Read back what an offline wandb run wrote (tests only).

An offline run's `run-*.wandb` file is a LevelDB-style log: a 7-byte W&B
header, then 32 KiB blocks of records, each with a 7-byte header (crc32,
length, type: 1 full, 2 first, 3 middle, 4 last); each whole record is a
serialised `wandb.proto.wandb_internal_pb2.Record`.
"""

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:                     # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):
            pending = body
        else:
            pending += body
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def wait_complete(path: Path, timeout: float = 60.0) -> None:
    """wandb's service process may still be writing after `finish()` returns:
    wait for the run's exit record."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} never got its exit record")


def history(path: Path) -> list[dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def summary(path: Path) -> dict:
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for i in rec.summary.update:
                out[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
