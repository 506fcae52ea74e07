"""Hugging Face layout <-> sjax params, config.json <-> ArchConfig, safetensors in and out.

One table (`_LAYER_MAP`) says how each HF tensor becomes a stacked sjax array; loading and
export both read it, so the two directions cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from sjax.errors import SjaxError
from sjax.models.transformer import ArchConfig, Params, param_shapes

_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# (HF name under model.layers.{i}., sjax name, HF [out, in] -> sjax, sjax -> HF)
_T = Callable[[np.ndarray, ArchConfig], np.ndarray]
_LAYER_MAP: list[tuple[str, str, _T, _T]] = [
    ("input_layernorm.weight", "attn_norm_ld", lambda w, a: w, lambda w, a: w),
    ("self_attn.q_proj.weight", "wq_ldnh",
     lambda w, a: w.T.reshape(a.d_model, a.n_heads, a.head_dim),
     lambda w, a: w.reshape(a.d_model, -1).T),
    ("self_attn.k_proj.weight", "wk_ldkh",
     lambda w, a: w.T.reshape(a.d_model, a.n_kv_heads, a.head_dim),
     lambda w, a: w.reshape(a.d_model, -1).T),
    ("self_attn.v_proj.weight", "wv_ldkh",
     lambda w, a: w.T.reshape(a.d_model, a.n_kv_heads, a.head_dim),
     lambda w, a: w.reshape(a.d_model, -1).T),
    ("self_attn.q_proj.bias", "bq_lnh", lambda w, a: w.reshape(a.n_heads, a.head_dim),
     lambda w, a: w.reshape(-1)),
    ("self_attn.k_proj.bias", "bk_lkh", lambda w, a: w.reshape(a.n_kv_heads, a.head_dim),
     lambda w, a: w.reshape(-1)),
    ("self_attn.v_proj.bias", "bv_lkh", lambda w, a: w.reshape(a.n_kv_heads, a.head_dim),
     lambda w, a: w.reshape(-1)),
    ("self_attn.o_proj.weight", "wo_lnhd",
     lambda w, a: w.T.reshape(a.n_heads, a.head_dim, a.d_model),
     lambda w, a: w.reshape(-1, a.d_model).T),
    ("post_attention_layernorm.weight", "mlp_norm_ld", lambda w, a: w, lambda w, a: w),
    ("mlp.gate_proj.weight", "wg_ldf", lambda w, a: w.T, lambda w, a: w.T),
    ("mlp.up_proj.weight", "wu_ldf", lambda w, a: w.T, lambda w, a: w.T),
    ("mlp.down_proj.weight", "wd_lfd", lambda w, a: w.T, lambda w, a: w.T),
]
_TOP_MAP = [("model.embed_tokens.weight", "embed_vd", False),
            ("model.norm.weight", "final_norm_d", False),
            ("lm_head.weight", "lm_head_dv", True)]  # True: stored transposed


# ----------------------------------------------------------------------------- config


def arch_from_hf_config(cfg: Mapping, source: str = "config.json") -> ArchConfig:
    """ArchConfig from a HF config dict (transformers v4 and v5 rope layouts)."""
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise SjaxError(f"{source}: architecture {model_type!r} is not supported "
                        f"(supported: {', '.join(_MODEL_TYPES)})")
    try:
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3 = None
        if rope_type == "llama3":
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                      float(rope["high_freq_factor"]),
                      int(rope["original_max_position_embeddings"]))
        elif rope_type not in ("default", None):
            raise SjaxError(f"{source}: rope type {rope_type!r} is not supported "
                            "(supported: default, llama3)")
        if cfg.get("use_sliding_window"):
            raise SjaxError(f"{source}: sliding-window attention is not supported")
        if cfg.get("mlp_bias"):
            raise SjaxError(f"{source}: mlp_bias=true is not supported")
        n_heads = int(cfg["num_attention_heads"])
        d = int(cfg["hidden_size"])
        return ArchConfig(
            arch=model_type,
            vocab_size=int(cfg["vocab_size"]),
            d_model=d,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or d // n_heads),
            d_ff=int(cfg["intermediate_size"]),
            rope_theta=float(theta),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_positions=int(cfg.get("max_position_embeddings", 32768)),
            rope_llama3=llama3,
        )
    except KeyError as e:
        raise SjaxError(f"{source}: missing key {e.args[0]!r}") from None


def hf_config_from_arch(arch: ArchConfig, bos_id: int | None, eos_id: int | None) -> dict:
    """A config.json that transformers loads into the matching *ForCausalLM."""
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_llama3:
        f, lo, hi, old = arch.rope_llama3
        rope = {"rope_type": "llama3", "rope_theta": arch.rope_theta, "factor": f,
                "low_freq_factor": lo, "high_freq_factor": hi,
                "original_max_position_embeddings": old}
    cfg = {
        "architectures": [_MODEL_TYPES[arch.arch]], "model_type": arch.arch,
        "vocab_size": arch.vocab_size, "hidden_size": arch.d_model,
        "intermediate_size": arch.d_ff, "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads, "num_key_value_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim, "hidden_act": "silu", "rms_norm_eps": arch.norm_eps,
        "max_position_embeddings": arch.max_positions, "rope_theta": arch.rope_theta,
        "rope_parameters": rope, "tie_word_embeddings": arch.tie_embeddings,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": "float32",
    }
    if arch.arch == "llama":
        cfg |= {"attention_bias": arch.qkv_bias, "mlp_bias": False}
    return cfg


# ----------------------------------------------------------------------------- tensors


def params_from_hf(tensors: Mapping[str, np.ndarray], arch: ArchConfig, source: str,
                   dtype=np.float32) -> Params:
    """Stack HF-named [out, in] tensors into sjax params (numpy, host memory)."""
    shapes = param_shapes(arch)

    def get(name):
        if name not in tensors:
            raise SjaxError(f"{source}: missing tensor {name!r}")
        return np.asarray(tensors[name], dtype=dtype)

    layers = {}
    for hf_name, ours, to_ours, _ in _LAYER_MAP:
        if ours not in shapes["layers"]:
            continue
        stacked = np.stack([to_ours(get(f"model.layers.{i}.{hf_name}"), arch)
                            for i in range(arch.n_layers)])
        _check_shape(source, hf_name, stacked.shape, shapes["layers"][ours])
        layers[ours] = stacked
    params: Params = {"layers": layers}
    for hf_name, ours, transposed in _TOP_MAP:
        if ours not in shapes:
            continue
        w = get(hf_name)
        params[ours] = w.T if transposed else w
        _check_shape(source, hf_name, params[ours].shape, shapes[ours])
    return params


def params_to_hf(params: Params, arch: ArchConfig) -> dict[str, np.ndarray]:
    out = {}
    for hf_name, ours, _, to_hf in _LAYER_MAP:
        if ours in params["layers"]:
            stacked = np.asarray(params["layers"][ours], np.float32)
            for i in range(arch.n_layers):
                out[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(to_hf(stacked[i], arch))
    for hf_name, ours, transposed in _TOP_MAP:
        if ours in params:
            w = np.asarray(params[ours], np.float32)
            out[hf_name] = np.ascontiguousarray(w.T if transposed else w)
    return out


def _check_shape(source, name, got, want):
    if tuple(got) != tuple(want):
        raise SjaxError(f"{source}: tensor {name!r} has shape {tuple(got)}, "
                        f"config says {tuple(want)}")


def read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF folder: model.safetensors or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise SjaxError(f"{index}: not a valid safetensors index ({e})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise SjaxError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise SjaxError(f"{path}: listed in the index but missing")
        tensors |= read_safetensors(path)
    return tensors


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bfloat16",
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map a safetensors file (8-byte header size, JSON header, raw little-endian data).

    Parsed here rather than through safetensors.numpy, which cannot represent bfloat16.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        data = np.memmap(path, np.uint8, "r", offset=8 + n)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES[info["dtype"]]
            dt = ml_dtypes.bfloat16 if dt == "bfloat16" else dt
            lo, hi = info["data_offsets"]
            if hi > data.size:
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            out[name] = data[lo:hi].view(dt).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SjaxError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    save_file(dict(tensors), str(path), metadata={"format": "pt"})
