"""JSONL files that survive crashes: append-only writers, readers that drop a torn tail."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sjax.errors import SjaxError


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """All complete rows. A last line without its newline (a write cut by a crash) is
    dropped, and with `repair` also cut from the file; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, offset = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(offset)
            break
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise SjaxError(f"{path}: line {len(rows) + 1} is not valid JSON") from None
        offset += len(line)
    return rows


def read_done_ids(path: Path) -> set:
    return {r["id"] for r in read_rows(path, repair=True)}


def write_rows(path: Path, rows) -> None:
    """Write a whole file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
