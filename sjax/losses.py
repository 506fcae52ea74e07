"""Next-token cross-entropy and teacher->student KL, computed in vocabulary chunks.

A 150k vocabulary at batch 16 x 128 tokens would need a 1.2 GB fp32 logits tensor and as
much again for its gradient. Here the forward keeps only a running max / sum-exp / target
logit per token while it scans the vocabulary in chunks, and the custom backward recomputes
each chunk's logits to form its share of the gradients. Peak extra memory is one
[tokens, chunk] block. Shape suffixes: n tokens, d model, v vocab, c chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(w_dv: jax.Array, chunk: int):
    """[n_chunks, d, chunk] view of the head, zero-padded; and the number of real columns."""
    d, v = w_dv.shape
    n_chunks = -(-v // chunk)
    w = jnp.pad(w_dv, ((0, 0), (0, n_chunks * chunk - v)))
    return w.reshape(d, n_chunks, chunk).transpose(1, 0, 2), v


def _chunk_logits(h_nd, w_dc, c, chunk, v):
    logits = jnp.einsum("nd,dc->nc", h_nd, w_dc.astype(h_nd.dtype),
                        preferred_element_type=jnp.float32)
    cols = c * chunk + jnp.arange(chunk)
    return jnp.where(cols < v, logits, -jnp.inf), cols


def _chunk_grads(h_nd, w_dc, d_nc, need_dw):
    """(dh contribution, dw chunk or None) of one chunk's logit gradient d_nc."""
    d_nc = d_nc.astype(h_nd.dtype)
    dh = jnp.einsum("nc,dc->nd", d_nc, w_dc.astype(h_nd.dtype),
                    preferred_element_type=jnp.float32)
    dw = (jnp.einsum("nd,nc->dc", h_nd, d_nc, preferred_element_type=jnp.float32)
          if need_dw else None)
    return dh, dw


def _unchunk_dw(dw_cdk, w_dv, need_dw):
    """[n_chunks, d, chunk] head gradient back to [d, v] (zeros for a frozen head)."""
    if not need_dw:
        return jnp.zeros_like(w_dv)
    d, v = w_dv.shape
    return dw_cdk.transpose(1, 0, 2).reshape(d, -1)[:, :v].astype(w_dv.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def token_ce(h_nd: jax.Array, w_dv: jax.Array, labels_n: jax.Array, chunk: int = 8192,
             need_dw: bool = True) -> jax.Array:
    """Per-token -log softmax(h @ w)[label], fp32 [n]; `need_dw=False` skips the head's
    gradient (frozen head, e.g. LoRA)."""
    return _ce_fwd(h_nd, w_dv, labels_n, chunk, need_dw)[0]


def _ce_fwd(h_nd, w_dv, labels_n, chunk, need_dw):
    w_cdk, v = _chunks(w_dv, chunk)
    n = h_nd.shape[0]

    def body(carry, xs):
        m, s, tgt = carry
        w_dc, c = xs
        logits, cols = _chunk_logits(h_nd, w_dc, c, chunk, v)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        hit = cols[None, :] == labels_n[:, None]
        tgt = tgt + jnp.where(hit, logits, 0.0).sum(-1)
        return (m_new, s, tgt), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    (m, s, tgt), _ = jax.lax.scan(body, init, (w_cdk, jnp.arange(w_cdk.shape[0])))
    lse = m + jnp.log(s)
    return lse - tgt, (h_nd, w_dv, labels_n, lse)


def _ce_bwd(chunk, need_dw, res, g_n):
    h_nd, w_dv, labels_n, lse = res
    w_cdk, v = _chunks(w_dv, chunk)

    def body(dh, xs):
        w_dc, c = xs
        logits, cols = _chunk_logits(h_nd, w_dc, c, chunk, v)
        p = jnp.exp(logits - lse[:, None])
        d_nc = (p - (cols[None, :] == labels_n[:, None])) * g_n[:, None]
        dh_c, dw = _chunk_grads(h_nd, w_dc, d_nc, need_dw)
        return dh + dh_c, dw

    dh, dw_cdk = jax.lax.scan(body, jnp.zeros(h_nd.shape, jnp.float32),
                              (w_cdk, jnp.arange(w_cdk.shape[0])))
    return dh.astype(h_nd.dtype), _unchunk_dw(dw_cdk, w_dv, need_dw), None


token_ce.defvjp(_ce_fwd, _ce_bwd)


def masked_ce(h_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
              chunk: int = 8192, need_dw: bool = True) -> tuple[jax.Array, jax.Array]:
    """(mean CE over tokens where mask is 1, number of such tokens).

    Masked rows are selected out (`where`), never multiplied by 0: a NaN or inf there (a
    padded row's activations) must reach neither the loss nor the gradients."""
    b, t, d = h_btd.shape
    keep_n = mask_bt.reshape(-1).astype(bool)
    h_nd = jnp.where(keep_n[:, None], h_btd.reshape(b * t, d), 0)
    loss_n = token_ce(h_nd, w_dv, targets_bt.reshape(-1), chunk, need_dw)
    count = keep_n.sum(dtype=jnp.float32)
    return jnp.where(keep_n, loss_n, 0.0).sum() / jnp.maximum(count, 1.0), count


# ----------------------------------------------------------------------------- distillation


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def token_kl(hs_nd: jax.Array, ws_dv: jax.Array, ht_nd: jax.Array, wt_dv: jax.Array,
             chunk: int = 8192, need_dw: bool = True) -> jax.Array:
    """Per-token KL(teacher || student) of softmax(ht @ wt) and softmax(hs @ ws), fp32 [n].

    One online pass over vocabulary chunks: running teacher max m, teacher sum-exp s, the
    student's log-sum-exp, and a = sum exp(z_t - m) (z_t - z_s); KL = a / s - lse_t + lse_s.
    The teacher gets no gradient (it is a fixed target); the student's is p_s - p_t.
    """
    return _kl_fwd(hs_nd, ws_dv, ht_nd, wt_dv, chunk, need_dw)[0]


def _kl_fwd(hs_nd, ws_dv, ht_nd, wt_dv, chunk, need_dw):
    ws_cdk, v = _chunks(ws_dv, chunk)
    wt_cdk, _ = _chunks(wt_dv, chunk)
    n = hs_nd.shape[0]

    def body(carry, xs):
        mt, st, at, ms, ss = carry
        w_s, w_t, c = xs
        zs, cols = _chunk_logits(hs_nd, w_s, c, chunk, v)
        zt, _ = _chunk_logits(ht_nd, w_t, c, chunk, v)
        mt_new, ms_new = jnp.maximum(mt, zt.max(-1)), jnp.maximum(ms, zs.max(-1))
        et = jnp.exp(zt - mt_new[:, None])
        scale = jnp.exp(mt - mt_new)
        diff = jnp.where(cols[None, :] < v, zt - zs, 0.0)  # padded columns: -inf - -inf
        at = at * scale + (et * diff).sum(-1)
        st = st * scale + et.sum(-1)
        ss = ss * jnp.exp(ms - ms_new) + jnp.exp(zs - ms_new[:, None]).sum(-1)
        return (mt_new, st, at, ms_new, ss), None

    neg = jnp.full((n,), -jnp.inf, jnp.float32)
    zero = jnp.zeros((n,), jnp.float32)
    (mt, st, at, ms, ss), _ = jax.lax.scan(body, (neg, zero, zero, neg, zero),
                                           (ws_cdk, wt_cdk, jnp.arange(ws_cdk.shape[0])))
    lse_t, lse_s = mt + jnp.log(st), ms + jnp.log(ss)
    kl = at / st - lse_t + lse_s
    return kl, (hs_nd, ws_dv, ht_nd, wt_dv, lse_s, lse_t)


def _kl_bwd(chunk, need_dw, res, g_n):
    hs_nd, ws_dv, ht_nd, wt_dv, lse_s, lse_t = res
    ws_cdk, v = _chunks(ws_dv, chunk)
    wt_cdk, _ = _chunks(wt_dv, chunk)

    def body(dh, xs):
        w_s, w_t, c = xs
        zs, _ = _chunk_logits(hs_nd, w_s, c, chunk, v)
        zt, _ = _chunk_logits(ht_nd, w_t, c, chunk, v)
        d_nc = (jnp.exp(zs - lse_s[:, None]) - jnp.exp(zt - lse_t[:, None])) * g_n[:, None]
        dh_c, dw = _chunk_grads(hs_nd, w_s, d_nc, need_dw)
        return dh + dh_c, dw

    dh, dw_cdk = jax.lax.scan(body, jnp.zeros(hs_nd.shape, jnp.float32),
                              (ws_cdk, wt_cdk, jnp.arange(ws_cdk.shape[0])))
    return (dh.astype(hs_nd.dtype), _unchunk_dw(dw_cdk, ws_dv, need_dw),
            jnp.zeros_like(ht_nd), jnp.zeros_like(wt_dv))


token_kl.defvjp(_kl_fwd, _kl_bwd)


def masked_kl(hs_bkd: jax.Array, ws_dv: jax.Array, ht_bkd: jax.Array, wt_dv: jax.Array,
              mask_bk: jax.Array, chunk: int = 8192,
              need_dw: bool = True) -> tuple[jax.Array, jax.Array]:
    """(mean KL(teacher || student) over positions where mask is 1, number of positions);
    masked rows are selected out, as in `masked_ce`."""
    b, k, d = hs_bkd.shape
    keep_n = mask_bk.reshape(-1).astype(bool)
    hs_nd = jnp.where(keep_n[:, None], hs_bkd.reshape(b * k, d), 0)
    ht_nd = jnp.where(keep_n[:, None], ht_bkd.reshape(b * k, d), 0)
    kl_n = token_kl(hs_nd, ws_dv, ht_nd, wt_dv, chunk, need_dw)
    count = keep_n.sum(dtype=jnp.float32)
    return jnp.where(keep_n, kl_n, 0.0).sum() / jnp.maximum(count, 1.0), count
