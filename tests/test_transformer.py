"""The decoder against transformers (torch, CPU, fp32), and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sjax.models.transformer import (forward, init_cache, init_params, param_shapes,
                                     positions_from_valid)

TOL = 1e-4


def _hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
        return model(torch.tensor(ids), **kw).logits.numpy()


def test_logits_match_transformers(tiny_pair, rng):
    model, arch, params = tiny_pair
    ids = rng.integers(0, arch.vocab_size, (3, 40))
    ours, _ = forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids), arch=arch)
    ref = _hf_logits(model, ids)
    assert np.abs(np.asarray(ours) - ref).max() <= TOL
    assert np.abs(ref).max() > 1.0  # the check is not trivially small numbers


def test_left_padded_batch_matches_transformers(tiny_pair, rng):
    model, arch, params = tiny_pair
    ids = rng.integers(5, arch.vocab_size, (2, 24))
    valid = np.ones_like(ids, bool)
    valid[0, :9] = False  # row 0 is left-padded
    pos = np.asarray(positions_from_valid(jnp.asarray(valid)))
    ours, _ = forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids), arch=arch,
                      positions_bt=jnp.asarray(pos), kv_valid_bs=jnp.asarray(valid))
    ref = _hf_logits(model, ids, attention_mask=valid, position_ids=pos)
    diff = np.abs(np.asarray(ours) - ref)[valid]
    assert diff.max() <= TOL
    # and the padded row equals the same prompt run alone
    alone, _ = forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids[:1, 9:]), arch=arch)
    assert np.abs(np.asarray(alone)[0] - np.asarray(ours)[0, 9:]).max() <= 1e-5


def test_remat_and_bf16(tiny_pair, rng):
    _, arch, params = tiny_pair
    jparams = jax.tree.map(jnp.asarray, params)
    ids = jnp.asarray(rng.integers(0, arch.vocab_size, (2, 16)))
    base = np.asarray(forward(jparams, ids, arch=arch)[0])
    for remat in ("full", "dots"):
        got = np.asarray(jax.jit(lambda p: forward(p, ids, arch=arch, remat=remat)[0])(jparams))
        np.testing.assert_allclose(got, base, atol=1e-5)

    def loss(p, remat):
        return forward(p, ids, arch=arch, remat=remat)[0].mean()

    g0 = jax.grad(loss)(jparams, "none")
    g1 = jax.grad(loss)(jparams, "full")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g0, g1)
    bf = forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), jparams), ids, arch=arch,
                 dtype=jnp.bfloat16)[0]
    assert bf.dtype == jnp.float32  # logits always come out fp32
    # bf16 keeps the model's ranking on most positions
    agree = (np.asarray(bf).argmax(-1) == base.argmax(-1)).mean()
    assert agree >= 0.8


def test_kv_cache_decode_equals_full_forward(tiny_pair, rng):
    _, arch, params = tiny_pair
    jparams = jax.tree.map(jnp.asarray, params)
    ids = rng.integers(0, arch.vocab_size, (2, 20))
    full = np.asarray(forward(jparams, jnp.asarray(ids), arch=arch)[0])
    cache = init_cache(arch, 2, 20)
    kv_valid = jnp.zeros((2, 20), bool).at[:, :8].set(True)
    logits, cache = forward(jparams, jnp.asarray(ids[:, :8]), arch=arch, cache=cache,
                            kv_valid_bs=kv_valid, write_index=0)
    np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=TOL)
    step = jax.jit(lambda p, tok, pos, kv, c, i: forward(p, tok, arch=arch, positions_bt=pos,
                                                         kv_valid_bs=kv, cache=c, write_index=i))
    for t in range(8, 20):
        kv_valid = kv_valid.at[:, t].set(True)
        pos = jnp.full((2, 1), t)
        logits, cache = step(jparams, jnp.asarray(ids[:, t:t + 1]), pos, kv_valid, cache, t)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=TOL)


def test_init_params_shapes_and_count():
    from sjax.models.transformer import ArchConfig

    arch = ArchConfig(arch="qwen2", vocab_size=100, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=8, d_ff=48, qkv_bias=True)
    params = init_params(arch, jax.random.key(0))
    shapes = jax.tree.map(lambda x: tuple(x.shape), params)
    assert shapes == param_shapes(arch)
    # hand count: embed + head + per layer (2 norms, q, k, v, o, 3 mlp, 3 biases) + final norm
    per_layer = 2 * 32 + 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48 + 32 + 2 * 16
    assert arch.n_params == 2 * 100 * 32 + 2 * per_layer + 32


def test_unsupported_arch_config():
    from sjax.errors import SjaxError
    from sjax.weights.hf import arch_from_hf_config

    with pytest.raises(SjaxError, match="gpt2"):
        arch_from_hf_config({"model_type": "gpt2"}, "x/config.json")
    with pytest.raises(SjaxError, match="missing key 'hidden_size'"):
        arch_from_hf_config({"model_type": "llama", "num_attention_heads": 2}, "x/config.json")
