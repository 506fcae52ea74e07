"""JSONL rows. Two readers, because a last line without its newline means two things:
in a user's file it is simply the last row; in a file sjax appends to (generation outputs,
resumed after a crash) it is a write the crash cut short."""

from __future__ import annotations

import json
from pathlib import Path

from sjax.errors import SjaxError
from sjax.files import atomic_write_text


def _parse(path: Path, lines: list[bytes]) -> list[dict]:
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise SjaxError(f"{path}: line {n} is not valid JSON") from None
    return rows


def read_rows(path: Path) -> list[dict]:
    """Every row of a complete file (blank lines skipped); any bad line is an error."""
    path = Path(path)
    if not path.is_file():
        raise SjaxError(f"{path}: no such file")
    return _parse(path, path.read_bytes().splitlines())


def resume_rows(path: Path) -> list[dict]:
    """The complete rows of a file sjax appends to: a last line without its newline (a
    write cut by a crash) is dropped and cut from the file, so appending can go on. A
    missing file has no rows yet."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return _parse(path, data[:end].splitlines())


def read_done_ids(path: Path) -> set:
    return {r["id"] for r in resume_rows(path)}


def write_rows(path: Path, rows) -> None:
    """Write a whole file atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
