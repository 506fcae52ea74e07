"""A params tree (nested dicts of arrays) <-> one safetensors file, keys joined by '/'.

Used for the artefacts a run hands between stages (LoRA adapters, fine-tuned weights):
safetensors only, never pickle, written atomically so a crash leaves no half file.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from sjax.errors import SjaxError
from sjax.files import atomic_write
from sjax.sharding import to_host
from sjax.weights.hf import read_safetensors, write_safetensors


def save_tree(path: Path, tree) -> None:
    flat = {"/".join(str(k.key) for k in kp):
            to_host(v) if isinstance(v, jax.Array) else np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    atomic_write(path, lambda tmp: write_safetensors(flat, tmp))


def load_tree(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SjaxError(f"{path}: no such weights file")
    out: dict = {}
    for key, value in read_safetensors(path).items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.array(value)
    return out
