"""An ensemble of MLPs as one set of stacked params with a leading model axis `m`.

Every function here is written for one model and lifted with `jax.vmap`, so N models train
as a handful of batched matmuls. Shape suffixes: m models, b batch, i input, h hidden, o out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


def init_one(key: jax.Array, sizes: tuple[int, ...]) -> Params:
    """Weights N(0, 1/sqrt(fan_in)) (std), biases zero: the protocol's init."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for j, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        params[f"w{j}_io"] = jax.random.normal(k, (fan_in, fan_out)) / jnp.sqrt(fan_in)
        params[f"b{j}_o"] = jnp.zeros((fan_out,))
    return params


def init_ensemble(key: jax.Array, n_models: int, sizes: tuple[int, ...]) -> Params:
    """Stacked params [m, ...]; model j's init depends only on (key, j)."""
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n_models))
    return jax.vmap(lambda k: init_one(k, sizes))(keys)


@jax.custom_vjp
def _mixed_dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _mixed_dot_fwd(x, w):
    return _mixed_dot(x, w), (x, w)


def _mixed_dot_bwd(res, g):
    # The cotangent arrives in fp32; cast it to the inputs' dtype so both backward matmuls
    # also run at the low-precision rate (accumulating in fp32), not upcast to fp32 ones.
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def dot(x, w, matmul_dtype=jnp.float32):
    """x @ w with inputs in `matmul_dtype`, accumulated and returned in fp32."""
    if jnp.dtype(matmul_dtype) == jnp.float32:
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    return _mixed_dot(x.astype(matmul_dtype), w.astype(matmul_dtype))


def apply_one(params: Params, x_bi: jax.Array, matmul_dtype=jnp.float32) -> jax.Array:
    """ReLU MLP logits for one model (fp32 out; matmul inputs in `matmul_dtype`, fp32
    accumulation: bf16 runs at ~2x the fp32 rate on CPUs with AVX512-BF16)."""
    n_layers = len(params) // 2
    h = x_bi
    for j in range(n_layers):
        h = dot(h, params[f"w{j}_io"], matmul_dtype) + params[f"b{j}_o"]
        if j < n_layers - 1:
            h = jax.nn.relu(h)
    return h


def n_params(sizes: tuple[int, ...]) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
