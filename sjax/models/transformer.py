"""Decoder-only transformer for the Qwen2/Qwen2.5 and Llama (SmolLM2, Llama-3.x) families.

Parameters are one nested dict whose per-layer arrays are stacked on a leading `l` axis, so
the forward is a single `lax.scan` and compile time does not grow with depth. The forward is
a pure function of (params, tokens): callers hold the params dict and jit `forward` (or the
sampler / train step built on it).

Shape suffixes: b batch, t query time, s key time (cache slots), d model, n query heads,
k kv heads, g queries per kv head, h head dim, f mlp, v vocab, l layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjax.errors import SjaxError

ARCHS = ("qwen2", "llama")
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Architecture hyper-parameters, read from a HF config.json or GGUF metadata."""

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_positions: int = 32768
    # Llama-3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_positions)
    rope_llama3: tuple[float, float, float, int] | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise SjaxError(f"architecture {self.arch!r} is not supported "
                            f"(supported: {', '.join(ARCHS)})")
        if self.n_heads % self.n_kv_heads:
            raise SjaxError(f"n_heads={self.n_heads} is not a multiple of "
                            f"n_kv_heads={self.n_kv_heads}")

    @property
    def n_params(self) -> int:
        """Parameter count (embedding and head each once, even when tied)."""
        shapes = jax.tree.leaves(param_shapes(self), is_leaf=lambda x: isinstance(x, tuple))
        return sum(int(np.prod(s)) for s in shapes)


# ----------------------------------------------------------------------------- params


def param_shapes(arch: ArchConfig) -> Params:
    """Shapes of every parameter, as a tree of tuples mirroring the params dict."""
    L, d, n, k, h, f, v = (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads,
                           arch.head_dim, arch.d_ff, arch.vocab_size)
    layers = {
        "attn_norm_ld": (L, d),
        "wq_ldnh": (L, d, n, h),
        "wk_ldkh": (L, d, k, h),
        "wv_ldkh": (L, d, k, h),
        "wo_lnhd": (L, n, h, d),
        "mlp_norm_ld": (L, d),
        "wg_ldf": (L, d, f),
        "wu_ldf": (L, d, f),
        "wd_lfd": (L, f, d),
    }
    if arch.qkv_bias:
        layers |= {"bq_lnh": (L, n, h), "bk_lkh": (L, k, h), "bv_lkh": (L, k, h)}
    shapes = {"embed_vd": (v, d), "layers": layers, "final_norm_d": (d,)}
    if not arch.tie_embeddings:
        shapes["lm_head_dv"] = (d, v)
    return shapes


def param_logical_axes(arch: ArchConfig) -> Params:
    """Logical axis names per parameter dimension; `sjax.sharding` maps them to mesh axes."""
    axes = {
        "attn_norm_ld": ("layers", None),
        "wq_ldnh": ("layers", "embed", "heads", None),
        "wk_ldkh": ("layers", "embed", "kv_heads", None),
        "wv_ldkh": ("layers", "embed", "kv_heads", None),
        "wo_lnhd": ("layers", "heads", None, "embed"),
        "mlp_norm_ld": ("layers", None),
        "wg_ldf": ("layers", "embed", "mlp"),
        "wu_ldf": ("layers", "embed", "mlp"),
        "wd_lfd": ("layers", "mlp", "embed"),
        "bq_lnh": ("layers", "heads", None),
        "bk_lkh": ("layers", "kv_heads", None),
        "bv_lkh": ("layers", "kv_heads", None),
    }
    layer_names = param_shapes(arch)["layers"]
    tree = {"embed_vd": ("vocab", "embed"), "layers": {n: axes[n] for n in layer_names},
            "final_norm_d": (None,)}
    if not arch.tie_embeddings:
        tree["lm_head_dv"] = ("embed", "vocab")
    return tree


def init_params(arch: ArchConfig, key: jax.Array, param_dtype=jnp.float32) -> Params:
    """Random init as in transformers (normal(0.02) matrices, unit norms, zero biases)."""
    shapes = param_shapes(arch)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if "norm" in name:
            leaves.append(jnp.ones(shape, param_dtype))
        elif name.startswith("b"):
            leaves.append(jnp.zeros(shape, param_dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(param_dtype))
    return jax.tree.unflatten(treedef, leaves)


def matmul_params(arch: ArchConfig) -> int:
    """Parameters that take part in matmuls per token (LM head in, embedding lookup out):
    the N of the 2N (forward) / 6N (training) FLOPs-per-token conventions."""
    d, n, k, h, f = arch.d_model, arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.d_ff
    per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
    return arch.n_layers * per_layer + d * arch.vocab_size


# ----------------------------------------------------------------------------- forward


def rope_inv_freq(arch: ArchConfig) -> np.ndarray:
    """Inverse rotary frequencies [h/2], with Llama-3 scaling when configured."""
    h = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    if arch.rope_llama3 is not None:
        factor, low, high, old_len = arch.rope_llama3
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the HF layout: first and second halves of each head are paired)."""
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def attention(q_btnh, k_bskh, v_bskh, mask_bts):
    """Grouped-query attention; softmax in fp32; masked rows never produce NaN."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts,
                             jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = mm("bkgts,bskh->btkgh", probs, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapters:
    """LoRA adapters carried inside a params dict (`params["lora"]`, see `with_adapters`).

    A trained LoRA model is evaluated, sampled and used as a teacher through the very
    adapter path it was trained with, so it is exactly the model that was trained: merging
    A @ B into bf16 base weights rounds most of a small update away. The scale is static
    (a Python float, as in the train step), so the forward multiplies exactly as training did.
    """

    tree: Params  # {'layers': {weight name: {'a', 'b'}}}
    scale: float = dataclasses.field(metadata=dict(static=True))


def with_adapters(params: Params, tree: Params, scale: float) -> Params:
    """`params` with LoRA adapters attached: every forward over them applies the adapters."""
    if "lora" in params:
        raise SjaxError("with_adapters: these params already carry adapters")
    return params | {"lora": Adapters(tree, float(scale))}


def lora_equations(eq: str) -> tuple[str, str, str]:
    """For a projection 'in,weight->out', the LoRA equations (x @ A, then @ B) and the
    merge equation A @ B -> weight: A spans the weight's contracted dims, B its outputs."""
    (x_sub, w_sub), out_sub = eq.split("->")[0].split(","), eq.split("->")[1]
    contracted = "".join(c for c in w_sub if c in x_sub)
    w_out = "".join(c for c in w_sub if c not in x_sub)
    keep = "".join(c for c in x_sub if c not in contracted)
    return (f"{x_sub},{contracted}r->{keep}r", f"{keep}r,r{w_out}->{out_sub}",
            f"{contracted}r,r{w_out}->{w_sub}")


def mm(eq, x, w):
    """einsum accumulating in fp32, result in x's dtype. XLA's CPU bf16 dot is ~3.5x faster
    with an fp32 result than with a bf16 one (and ~2x the fp32 dot) on AVX512-BF16."""
    w = w.astype(x.dtype)
    if x.dtype == jnp.float32:
        return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
    return _mm_low(eq, x, w)


def _einsum_f32(eq, a, b, dtype):
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mm_low(eq, x, w):
    return _einsum_f32(eq, x, w, x.dtype)


def _mm_low_fwd(eq, x, w):
    return _mm_low(eq, x, w), (x, w)


def _mm_low_bwd(eq, res, g):
    # Autodiff would upcast the backward matmuls to fp32 (the dot's result type); keep
    # them in the low precision with fp32 accumulation, like the forward.
    x, w = res
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    g = g.astype(x.dtype)
    return (_einsum_f32(f"{out},{ws}->{xs}", g, w, x.dtype),
            _einsum_f32(f"{xs},{out}->{ws}", x, g, w.dtype))


_mm_low.defvjp(_mm_low_fwd, _mm_low_bwd)


def _dense(x, w, eq, b=None, lora=None, lora_scale=1.0):
    """x @ w (+ bias) (+ the LoRA path (x @ A) @ B * scale, never forming A @ B)."""
    y = mm(eq, x, w)
    if lora is not None:
        eq_a, eq_b, _ = lora_equations(eq)
        y = y + mm(eq_b, mm(eq_a, x, lora["a"]), lora["b"]) * lora_scale
    return y if b is None else y + b.astype(x.dtype)


# The projection each weight performs (per layer); LoRA derives its equations from these.
PROJECTIONS = {"wq_ldnh": "btd,dnh->btnh", "wk_ldkh": "btd,dkh->btkh",
               "wv_ldkh": "btd,dkh->btkh", "wo_lnhd": "btnh,nhd->btd",
               "wg_ldf": "btd,df->btf", "wu_ldf": "btd,df->btf", "wd_lfd": "btf,fd->btd"}


def forward(params: Params, tokens_bt: jax.Array, *, arch: ArchConfig,
            positions_bt: jax.Array | None = None, kv_valid_bs: jax.Array | None = None,
            cache: dict | None = None, write_index: jax.Array | int = 0,
            dtype=jnp.float32, remat: str = "none", return_hidden: bool = False,
            lora: Params | None = None, lora_scale: float = 1.0):
    """Run the decoder; returns (logits_btv fp32 or hidden_btd, new cache or None).

    Without a cache the keys are this call's tokens and `kv_valid_bs` (default all true)
    marks padding. With a cache (`init_cache`), this call's keys/values are written at cache
    slot `write_index` onward (the same slot for every row: prompts are left-padded) and the
    queries attend to every valid slot up to their own; `kv_valid_bs` then spans the cache
    ([b, s], or [b, t, s] per query: a trie's tokens each see the prompt and their ancestors).
    `lora` ({'layers': {weight name: {'a', 'b'}}}, see sjax.lora) adds low-rank adapters,
    as do adapters carried in `params["lora"]` (`with_adapters`).
    """
    if "lora" in params:  # a trained LoRA model (`with_adapters`)
        if lora is not None:
            raise ValueError("forward: params carry adapters and lora= was given too")
        lora, lora_scale = params["lora"].tree, params["lora"].scale
    b, t = tokens_bt.shape
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    inv_freq = rope_inv_freq(arch)
    slots_q = write_index + jnp.arange(t)
    if cache is None:
        s = t
        if kv_valid_bs is None:
            kv_valid_bs = jnp.ones((b, s), bool)
    else:
        s = cache["k_lbskh"].shape[2]
        if kv_valid_bs is None:
            raise ValueError("forward with a cache needs kv_valid_bs over the cache slots")
    # kv_valid [b, s] marks padding; [b, t, s] says per query which slots it may see (tree
    # attention over a trie of continuations); either way no query sees a later slot
    seen_bts = kv_valid_bs[:, None, :] if kv_valid_bs.ndim == 2 else kv_valid_bs
    mask_bts = (jnp.arange(s)[None, :] <= slots_q[:, None])[None] & seen_bts

    x_btd = params["embed_vd"].astype(dtype)[tokens_bt]

    def block(carry, layer):
        # The cache rides in the carry and is updated in place at (layer, slot): scanning it
        # as xs/ys instead would copy the whole [l, b, s, k, h] cache on every decode step.
        x_btd, kc, vc = carry
        p, ad, i = layer

        def proj(x, name, bias=None):
            return _dense(x, p[name], PROJECTIONS[name], None if bias is None else p.get(bias),
                          None if ad is None else ad.get(name), lora_scale)

        h_btd = rms_norm(x_btd, p["attn_norm_ld"], arch.norm_eps)
        q = proj(h_btd, "wq_ldnh", "bq_lnh")
        k = proj(h_btd, "wk_ldkh", "bk_lkh")
        v = proj(h_btd, "wv_ldkh", "bv_lkh")
        q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
        if kc is not None:
            start = (i, 0, write_index, 0, 0)
            kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), start)
            vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), start)
            k = jax.lax.dynamic_index_in_dim(kc, i, keepdims=False).astype(dtype)
            v = jax.lax.dynamic_index_in_dim(vc, i, keepdims=False).astype(dtype)
        attn_btnh = attention(q, k, v, mask_bts)
        x_btd = x_btd + proj(attn_btnh, "wo_lnhd")
        h_btd = rms_norm(x_btd, p["mlp_norm_ld"], arch.norm_eps)
        gate_btf = jax.nn.silu(proj(h_btd, "wg_ldf"))
        x_btd = x_btd + proj(gate_btf * proj(h_btd, "wu_ldf"), "wd_lfd")
        return (x_btd, kc, vc), None

    if remat == "full":
        block = jax.checkpoint(block)
    elif remat == "dots":
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    kv = (cache["k_lbskh"], cache["v_lbskh"]) if cache is not None else (None, None)
    adapters = None if lora is None else lora["layers"]
    (x_btd, k_new, v_new), _ = jax.lax.scan(
        block, (x_btd, *kv), (params["layers"], adapters, jnp.arange(arch.n_layers)))
    new_cache = None if cache is None else {"k_lbskh": k_new, "v_lbskh": v_new}

    x_btd = rms_norm(x_btd, params["final_norm_d"], arch.norm_eps)
    if return_hidden:
        return x_btd, new_cache
    return logits_from_hidden(params, x_btd, arch), new_cache


def head_matrix_dv(params: Params, arch: ArchConfig) -> jax.Array:
    """The output projection [d, v]: the embedding's transpose when tied."""
    return params["embed_vd"].T if arch.tie_embeddings else params["lm_head_dv"]


def logits_from_hidden(params: Params, x_btd: jax.Array, arch: ArchConfig) -> jax.Array:
    w_dv = head_matrix_dv(params, arch).astype(x_btd.dtype)
    return jnp.einsum("btd,dv->btv", x_btd, w_dv, preferred_element_type=jnp.float32)


def init_cache(arch: ArchConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
    shape = (arch.n_layers, batch, slots, arch.n_kv_heads, arch.head_dim)
    return {"k_lbskh": jnp.zeros(shape, dtype), "v_lbskh": jnp.zeros(shape, dtype)}


def positions_from_valid(valid_bt: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=-1) - 1, 0)
