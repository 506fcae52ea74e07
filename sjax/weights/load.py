"""The front door for checkpoints: resolve a ModelConfig, load onto a mesh, export back.

Sources: a registry name, a local `.gguf` file, or a local Hugging Face folder
(config.json + safetensors). Tokenizers come from the folder, or are converted once from the
GGUF metadata by transformers and cached under the file's sha256.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sjax import files, sharding
from sjax.config import ModelConfig
from sjax.errors import SjaxError
from sjax.models.transformer import (ArchConfig, Params, init_params, param_logical_axes,
                                     param_shapes)
from sjax.weights import gguf as gguf_io
from sjax.weights import hf, random_init, registry


@dataclasses.dataclass
class LoadedModel:
    arch: ArchConfig
    params: Params  # jax arrays, placed with `shardings`
    tokenizer: Any
    source: Path
    load_seconds: float


def resolve_source(cfg: ModelConfig) -> Path:
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise SjaxError(f"model.path: {path}: no such file or folder")
        return path
    if cfg.init == "random":  # an architecture folder shipped with sjax: no weights
        return random_init.arch_dir(cfg.name)
    return registry.resolve(cfg.name)


def _open(path: Path):
    """(arch, a thunk that reads fp32 numpy params): the architecture costs no tensor reads."""
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise SjaxError(f"{path}: not a Hugging Face model folder (no config.json)")
        try:
            hf_cfg = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise SjaxError(f"{cfg_file}: invalid JSON ({e})") from None
        arch = hf.arch_from_hf_config(hf_cfg, str(cfg_file))
        return arch, lambda: hf.params_from_hf(hf.read_safetensors_folder(path), arch, str(path))
    if not gguf_io.is_gguf(path):
        raise SjaxError(f"{path}: not a model file (neither GGUF nor a Hugging Face folder)")
    reader = gguf_io.open_reader(path)
    arch = gguf_io.arch_from_gguf(reader, path)
    return arch, lambda: hf.params_from_hf(gguf_io.hf_tensors_from_gguf(reader, arch, path),
                                           arch, str(path))


def read_arch(path: Path) -> ArchConfig:
    return _open(path)[0]


def read_checkpoint(path: Path) -> tuple[ArchConfig, Params]:
    """Architecture and fp32 numpy params from a .gguf file or a HF folder."""
    arch, read_params = _open(path)
    return arch, read_params()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    # Converting a GGUF vocabulary takes seconds; do it once per file content (and converter:
    # the suffix names sjax's own, gguf_io.tokenizer_from_gguf).
    entry = next((e for e in registry.REGISTRY.values()
                  if path == registry.model_path(e.name)), None)
    digest = entry.file.sha256 if entry else files.sha256_file(path)
    cached = files.cache_dir() / "tokenizers" / f"{digest[:16]}-sjax"
    if not cached.is_dir():  # renamed into place whole: present means complete
        with files.locked(cached, f"converting the tokenizer of {path}"):
            if not cached.is_dir():
                tok = gguf_io.tokenizer_from_gguf(gguf_io.open_reader(path), path)
                files.atomic_write(cached, lambda tmp: tok.save_pretrained(str(tmp)))
    return AutoTokenizer.from_pretrained(str(cached))


def param_shardings(arch: ArchConfig, mesh: Mesh):
    return sharding.tree_shardings(param_logical_axes(arch), param_shapes(arch), mesh)


def init_sharded(arch: ArchConfig, key: jax.Array, mesh: Mesh, param_dtype=jnp.float32) -> Params:
    """Random params created directly in their shardings: each device computes its shards."""
    return jax.jit(lambda k: init_params(arch, k, param_dtype),
                   out_shardings=param_shardings(arch, mesh))(key)


def load_model(cfg: ModelConfig, mesh: Mesh) -> LoadedModel:
    """Read, convert and place a checkpoint directly into its shardings on `mesh`."""
    if cfg.init == "random":
        return random_init.random_model(cfg, mesh)
    t0 = time.perf_counter()
    path = resolve_source(cfg)
    arch, host_params = read_checkpoint(path)
    params = sharding.place(host_params, param_shardings(arch, mesh),
                            dtype=jnp.dtype(cfg.param_dtype))
    jax.block_until_ready(params)
    tokenizer = load_tokenizer(path)
    return LoadedModel(arch, params, tokenizer, path, time.perf_counter() - t0)


def export_hf(folder: Path, arch: ArchConfig, params: Params, tokenizer) -> None:
    """Write a HF folder (safetensors + config.json + tokenizer) that transformers loads."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise SjaxError(f"{folder}: export target exists and is not empty")
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    hf_cfg = hf.hf_config_from_arch(arch, tokenizer.bos_token_id, tokenizer.eos_token_id)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        hf.write_safetensors(hf.params_to_hf(host, arch), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        tokenizer.save_pretrained(str(tmp))

    files.atomic_write(folder, write)
