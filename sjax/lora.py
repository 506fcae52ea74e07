"""LoRA adapters on the seven projections: `x @ W + (x @ A) @ B * alpha / r`, base frozen.

Adapters are a params-like tree {'layers': {weight name: {'a': [l, in.., r], 'b': [l, r,
out..]}}}; the forward applies them without ever forming A @ B, and `merge` folds them into
the base weights for export. B starts at zero, so a fresh adapter is exactly the base model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sjax.models.transformer import PROJECTIONS, ArchConfig, Params, lora_equations, param_shapes

TARGETS = tuple(PROJECTIONS)  # q, k, v, o, gate, up, down


def _split_weight(name: str, per_dim: tuple) -> tuple[tuple, tuple]:
    """Split per-dimension values (sizes, axis names) of a stacked weight [l, ...] into
    (contracted dims, output dims) of its projection: A spans the first, B the second."""
    x_sub, w_sub = PROJECTIONS[name].split("->")[0].split(",")
    by_letter = dict(zip(w_sub, per_dim[1:]))
    return (tuple(by_letter[c] for c in w_sub if c in x_sub),
            tuple(by_letter[c] for c in w_sub if c not in x_sub))


def init_lora(arch: ArchConfig, key: jax.Array, rank: int, targets=TARGETS,
              dtype=jnp.float32) -> Params:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform bound), B = 0."""
    shapes = param_shapes(arch)["layers"]
    out = {}
    for k, name in zip(jax.random.split(key, len(targets)), targets):
        L = shapes[name][0]
        ins, outs = _split_weight(name, shapes[name])
        fan_in = 1
        for d in ins:
            fan_in *= d
        bound = 1.0 / fan_in ** 0.5
        out[name] = {"a": jax.random.uniform(k, (L, *ins, rank), dtype, -bound, bound),
                     "b": jnp.zeros((L, rank, *outs), dtype)}
    return {"layers": out}


def lora_logical_axes(lora: Params, base_axes: Params) -> Params:
    """Adapters follow their weight's sharding on the in/out dims; the rank is replicated."""
    out = {}
    for name in lora["layers"]:
        ins, outs = _split_weight(name, base_axes["layers"][name])
        out[name] = {"a": ("layers", *ins, None), "b": ("layers", None, *outs)}
    return {"layers": out}


def merge(params: Params, lora: Params, scale: float) -> Params:
    """Base params with each adapter folded in, in fp32: W + scale * A @ B.

    The merged weights stay fp32 (for export): cast back to a bf16 base, a small update
    (a few steps at lr 2e-4) is mostly rounded away. To evaluate a trained model, attach
    its adapters instead (`transformer.with_adapters`): that is the trained forward itself.
    """
    layers = dict(params["layers"])
    for name, ab in lora["layers"].items():
        _, _, eq_merge = lora_equations(PROJECTIONS[name])
        delta = jax.vmap(lambda a, b: jnp.einsum(eq_merge, a, b, precision="highest",
                                                 preferred_element_type=jnp.float32))(
            ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        layers[name] = layers[name].astype(jnp.float32) + scale * delta
    return params | {"layers": layers}
