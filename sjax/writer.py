"""The process-0 rule in one place: every file a run writes (run-folder artefacts, generated
rows, metrics and TensorBoard events, checkpoint identities) goes through a `Writer`; on any
other process its methods do nothing, while the compute before them runs everywhere. Across
hosts the folder must be shared storage, so one writer is also the only safe one."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO, Iterator

import jax

from sjax import distributed
from sjax.files import atomic_write_json
from sjax.jsonl import write_rows
from sjax.sharding import to_host
from sjax.weights.tree import save_tree


class Writer:
    def __init__(self, main: bool | None = None):
        self.main = distributed.is_main() if main is None else main

    def mkdir(self, path: Path) -> None:
        if self.main:
            Path(path).mkdir(parents=True, exist_ok=True)

    def write_json(self, path: Path, obj) -> None:
        if self.main:
            atomic_write_json(path, obj)

    def write_rows(self, path: Path, rows) -> None:
        if self.main:
            write_rows(path, rows)

    def save_params(self, path: Path, tree) -> None:
        """Gathered on every process (across hosts a collective), written by process 0."""
        host = jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, tree)
        if self.main:
            save_tree(path, host)

    @contextlib.contextmanager
    def appending(self, path: Path) -> Iterator[IO[str] | None]:
        """`path` opened for appending (its folder made) on process 0; None elsewhere."""
        if not self.main:
            yield None
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            yield f
