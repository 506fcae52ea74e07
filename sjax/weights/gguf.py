"""GGUF checkpoints: architecture from metadata, tensors dequantised to HF layout.

The `gguf` package dequantises every tensor type in the shipped files into HF's [out, in]
layout; llama-architecture files additionally store Q/K rows permuted by llama.cpp's
converter, which `_unpermute` undoes per head.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from sjax.errors import SjaxError
from sjax.models.transformer import ARCHS, ArchConfig

GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_reader(path: Path):
    if not is_gguf(path):
        raise SjaxError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt: gguf raises assorted errors
        raise SjaxError(f"{path}: unreadable GGUF ({type(e).__name__}: {e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def arch_from_gguf(reader, path: Path) -> ArchConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise SjaxError(f"{path}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHS)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise SjaxError(f"{path}: GGUF rope_freqs (Llama-3.1 rope scaling) is not supported; "
                        "load the Hugging Face folder instead")
    try:
        d = int(_field(reader, f"{arch}.embedding_length"))
        n = int(_field(reader, f"{arch}.attention.head_count"))
        vocab = _field(reader, f"{arch}.vocab_size") or len(
            reader.fields["tokenizer.ggml.tokens"].data)
        return ArchConfig(
            arch=arch, vocab_size=int(vocab), d_model=d,
            n_layers=int(_field(reader, f"{arch}.block_count")), n_heads=n,
            n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n)),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", d // n)),
            d_ff=int(_field(reader, f"{arch}.feed_forward_length")),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            max_positions=int(_field(reader, f"{arch}.context_length", 32768)),
        )
    except (TypeError, KeyError) as e:
        raise SjaxError(f"{path}: GGUF metadata incomplete ({e})") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved -> rotate-half pairs)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def hf_tensors_from_gguf(reader, arch: ArchConfig, path: Path) -> dict[str, np.ndarray]:
    """Dequantise every tensor to fp32 under its HF name."""
    out = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise SjaxError(f"{path}: unexpected tensor {t.name!r}")
            name = f"model.layers.{i}.{_LAYER_NAMES[rest]}"
        elif t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        else:
            raise SjaxError(f"{path}: unexpected tensor {t.name!r}")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch.arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _unpermute(w, arch.n_heads if ".attn_q." in t.name else arch.n_kv_heads)
        out[name] = w
    return out
