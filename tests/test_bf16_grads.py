"""bf16 gradients of the hand-written VJPs against fp32 autodiff on the same (bf16-rounded)
inputs.

Each check is an elementwise bound derived from bf16 rounding, not a loose atol: a bf16
result rounded from an exact fp32 sum is within 2^-8 of it (relative), and a sum of terms
each rounded to bf16 is within 2^-8 of the sum of their magnitudes. Cotangents are
bf16-representable so the only rounding is the one the code does. Every dimension has its
own size, so a wrong transpose or a mis-indexed einsum fails on shapes; where a wrong
variant fits the shapes (a square weight, a swapped pairing), the test computes its error
and asserts it exceeds the bound 10x. Backward matmuls must take bf16 operands with fp32
accumulation (a missing cast would run them in fp32, silently twice as slow).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjax.losses import token_ce, token_kl
from sjax.lora import TARGETS
from sjax.mnist import mlp
from sjax.models.transformer import PROJECTIONS, lora_equations, mm

EPS = 2.0 ** -8  # bf16: 8 significant bits, round to nearest
SIZES = dict(b=2, t=3, s=9, d=5, n=4, h=6, k=7, g=8, f=10, r=11)


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32).astype(jnp.bfloat16)


def _f32(x):
    return x.astype(jnp.float32)


def _dots(jaxpr):
    """Every dot_general equation in a jaxpr, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dots(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dots(sub)


def _assert_low_precision_dots(fn, *args):
    dots = list(_dots(jax.make_jaxpr(fn)(*args).jaxpr))
    assert dots
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def _excess(got, ref, tol):
    """max |got - ref| / tol: <= 1 means within the bound."""
    return float(jnp.max(jnp.abs(_f32(got) - ref) / tol))


def _mm_equations():
    eqs = set(PROJECTIONS.values()) | {"bkgts,bskh->btkgh"}  # + attention's probs @ v
    for name in TARGETS:
        eq_a, eq_b, _ = lora_equations(PROJECTIONS[name])
        eqs |= {eq_a, eq_b}
    return sorted(eqs)


@pytest.mark.parametrize("eq", _mm_equations())
def test_mm_low_grads_match_fp32(eq):
    rng = np.random.default_rng(0)
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    x = _bf16(rng, [SIZES[c] for c in xs])
    w = _bf16(rng, [SIZES[c] for c in ws])
    ct = _f32(_bf16(rng, [SIZES[c] for c in out]))

    def ours(x, w):
        return jnp.sum(_f32(mm(eq, x, w)) * ct)  # bf16 x: the low-precision path

    def ref(x, w, ct=ct):
        return jnp.sum(jnp.einsum(eq, x, w, precision="highest") * ct)

    gx, gw = jax.grad(ours, (0, 1))(x, w)
    rx, rw = jax.grad(ref, (0, 1))(_f32(x), _f32(w))
    ax, aw = jax.grad(ref, (0, 1))(jnp.abs(_f32(x)), jnp.abs(_f32(w)), jnp.abs(ct))
    assert gx.dtype == gw.dtype == jnp.bfloat16
    tol_x, tol_w = EPS * jnp.abs(rx) + 2e-6 * ax, EPS * jnp.abs(rw) + 2e-6 * aw
    assert _excess(gx, rx, tol_x) <= 1 and _excess(gw, rw, tol_w) <= 1
    # a swapped pairing (x's rows with the reversed cotangent) misses the bound by far
    wrong = jax.grad(ref, 1)(_f32(x), _f32(w), jnp.flip(ct, 0))
    assert _excess(wrong, rw, tol_w) > 10
    _assert_low_precision_dots(jax.grad(ours, (0, 1)), x, w)


def test_mlp_mixed_dot_grads_match_fp32():
    rng = np.random.default_rng(1)
    x = _f32(_bf16(rng, (6, 7)))  # fp32 arrays holding bf16 values: the cast is exact
    ct = _f32(_bf16(rng, (6, 3)))

    def ours(x, w, ct=ct):
        return jnp.sum(mlp.dot(x, w, jnp.bfloat16) * ct)

    def ref(x, w, ct=ct):
        return jnp.sum(jnp.dot(x, w, precision="highest") * ct)

    w = _f32(_bf16(rng, (7, 3)))
    gx, gw = jax.grad(ours, (0, 1))(x, w)
    rx, rw = jax.grad(ref, (0, 1))(x, w)
    ax, aw = jax.grad(ref, (0, 1))(jnp.abs(x), jnp.abs(w), jnp.abs(ct))
    tol_x, tol_w = EPS * jnp.abs(rx) + 2e-6 * ax, EPS * jnp.abs(rw) + 2e-6 * aw
    assert _excess(gx, rx, tol_x) <= 1 and _excess(gw, rw, tol_w) <= 1
    _assert_low_precision_dots(jax.grad(ours, (0, 1)), x, w)
    # a square weight, where a missing transpose (dx = g @ w) fits the shapes
    sq = _f32(_bf16(rng, (7, 7)))
    ct7 = _f32(_bf16(rng, (6, 7)))
    gx = jax.grad(ours)(x, sq, ct7)
    rx = jax.grad(ref)(x, sq, ct7)
    tol = EPS * jnp.abs(rx) + 2e-6 * jax.grad(ref)(x, jnp.abs(sq), jnp.abs(ct7))
    assert _excess(gx, rx, tol) <= 1
    assert _excess(ct7 @ sq, rx, tol) > 10


N, D, V, CHUNK = 13, 24, 50, 16  # 50 = 3 full chunks + a padded one


def _ce_ref(h, w, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), labels[:, None], -1)[:, 0]


def _kl_ref(hs, ws, ht, wt):
    ls, lt = jax.nn.log_softmax(hs @ ws, -1), jax.nn.log_softmax(ht @ wt, -1)
    return (jnp.exp(lt) * (lt - ls)).sum(-1)


def _check_head_grads(dh, dw, h, w, rh, rw, d_logits):
    """dh, dw against fp32 (rh, rw), with the bound of a bf16 logit gradient d (each entry
    rounded) contracted with bf16 operands and the result rounded to bf16."""
    ah = jnp.abs(d_logits) @ jnp.abs(_f32(w)).T
    aw = jnp.abs(_f32(h)).T @ jnp.abs(d_logits)
    tol_h = EPS * (jnp.abs(rh) + ah) + 1e-6
    tol_w = EPS * (jnp.abs(rw) + aw) + 1e-6
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert _excess(dh, rh, tol_h) <= 1 and _excess(dw, rw, tol_w) <= 1


def test_token_ce_bf16_matches_fp32():
    rng = np.random.default_rng(2)
    h, w = _bf16(rng, (N, D)), _bf16(rng, (D, V))
    labels = jnp.asarray(rng.integers(0, V, N))
    g = _f32(_bf16(rng, (N,)))  # per-token cotangent
    loss = token_ce(h, w, labels, CHUNK)
    ref = _ce_ref(_f32(h), _f32(w), labels)
    # bf16 x bf16 products are exact in fp32: only summation order separates the two
    tol = 1e-5 * (1 + jnp.abs(ref))
    assert loss.dtype == jnp.float32 and _excess(loss, ref, tol) <= 1
    # logits left in bf16 (no fp32 accumulation/result) would miss it by far
    z16 = _f32((_f32(h) @ _f32(w)).astype(jnp.bfloat16))
    wrong = -jnp.take_along_axis(jax.nn.log_softmax(z16, -1), labels[:, None], -1)[:, 0]
    assert _excess(wrong, ref, tol) > 10

    dh, dw = jax.grad(lambda h, w: jnp.sum(token_ce(h, w, labels, CHUNK) * g), (0, 1))(h, w)
    rh, rw = jax.grad(lambda h, w: jnp.sum(_ce_ref(h, w, labels) * g), (0, 1))(_f32(h), _f32(w))
    d_logits = jax.grad(lambda z: jnp.sum(-jnp.take_along_axis(
        jax.nn.log_softmax(z, -1), labels[:, None], -1)[:, 0] * g))(_f32(h) @ _f32(w))
    _check_head_grads(dh, dw, h, w, rh, rw, d_logits)
    _assert_low_precision_dots(
        jax.grad(lambda h, w: jnp.sum(token_ce(h, w, labels, CHUNK) * g), (0, 1)), h, w)


def test_token_kl_bf16_matches_fp32():
    rng = np.random.default_rng(3)
    hs, ht = _bf16(rng, (N, D)), _bf16(rng, (N, D))
    ws, wt = _bf16(rng, (D, V)), _bf16(rng, (D, V))
    g = _f32(_bf16(rng, (N,)))
    kl = token_kl(hs, ws, ht, wt, CHUNK)
    ref = _kl_ref(*map(_f32, (hs, ws, ht, wt)))
    tol = 1e-5 * (1 + jnp.abs(ref))
    assert float(ref.min()) > 0.1 and _excess(kl, ref, tol) <= 1

    dh, dw = jax.grad(lambda h, w: jnp.sum(token_kl(h, w, ht, wt, CHUNK) * g), (0, 1))(hs, ws)
    f_ht, f_wt = _f32(ht), _f32(wt)
    rh, rw = jax.grad(lambda h, w: jnp.sum(_kl_ref(h, w, f_ht, f_wt) * g), (0, 1))(
        _f32(hs), _f32(ws))
    p_t = jax.nn.softmax(f_ht @ f_wt, -1)
    d_logits = (jax.nn.softmax(_f32(hs) @ _f32(ws), -1) - p_t) * g[:, None]
    _check_head_grads(dh, dw, hs, ws, rh, rw, d_logits)
    _assert_low_precision_dots(
        jax.grad(lambda h, w: jnp.sum(token_kl(h, w, ht, wt, CHUNK) * g), (0, 1)), hs, ws)
