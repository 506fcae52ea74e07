"""Masked losses: a NaN or inf in a masked row must not reach the loss or its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjax.losses import masked_ce, masked_kl


def _inputs(seed):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    mask = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]])
    return h, w, mask


def _poison(x, mask, value):
    """x with `value` in every feature of the masked rows."""
    return jnp.where(mask[..., None].astype(bool), x, value)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_ce_ignores_non_finite_masked_rows(bad):
    h, w, mask = _inputs(0)
    tgt = jnp.asarray(np.random.default_rng(1).integers(0, 30, (2, 5)))

    def loss(h, w):
        return masked_ce(h, w, tgt, mask, 7)[0]

    clean = jax.value_and_grad(loss, (0, 1))(h, w)
    dirty = jax.value_and_grad(loss, (0, 1))(_poison(h, mask, bad), w)
    assert np.isfinite(float(clean[0])) and float(clean[0]) > 0.1
    jax.tree.map(np.testing.assert_array_equal, dirty, clean)
    # the masked rows get exactly zero gradient, the kept ones do not
    dh = np.asarray(dirty[1][0])
    assert np.all(dh[np.asarray(mask) == 0] == 0) and np.all(
        np.abs(dh[np.asarray(mask) == 1]).max(-1) > 0)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_kl_ignores_non_finite_masked_rows(bad):
    hs, ws, mask = _inputs(2)
    ht, wt, _ = _inputs(3)

    def loss(hs, ws, ht):
        return masked_kl(hs, ws, ht, wt, mask, 7)[0]

    clean = jax.value_and_grad(loss, (0, 1))(hs, ws, ht)
    dirty = jax.value_and_grad(loss, (0, 1))(_poison(hs, mask, bad), ws, _poison(ht, mask, bad))
    assert float(clean[0]) > 0.1
    jax.tree.map(np.testing.assert_array_equal, dirty, clean)
