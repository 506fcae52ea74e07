"""Batched generation: one jitted prefill, then one jitted `lax.while_loop` of decode steps.

Prompts are left-padded so every row's next token lands in the same cache slot; the loop
carries a small state (cache, last logits, finished flags, outputs) and never returns to the
host until every row has hit a stop token or `max_new_tokens`. Randomness comes from one key
per row folded with the step number, so a row's sample does not depend on its batch position.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sjax.errors import SjaxError
from sjax.models.transformer import (ArchConfig, Params, forward, init_cache,
                                     logits_from_hidden, positions_from_valid)


@dataclasses.dataclass(frozen=True)
class Greedy:
    def __call__(self, logits_bv, keys_b):
        return jnp.argmax(logits_bv, axis=-1)


@dataclasses.dataclass(frozen=True)
class Temperature:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if self.temperature <= 0:
            raise SjaxError(f"temperature must be > 0 (use Greedy for 0), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SjaxError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SjaxError(f"top_k must be >= 0, got {self.top_k}")

    def __call__(self, logits_bv, keys_b):
        logits_bv = logits_bv / self.temperature
        neg = jnp.finfo(logits_bv.dtype).min
        if self.top_k:
            kth = jax.lax.top_k(logits_bv, self.top_k)[0][:, -1:]
            logits_bv = jnp.where(logits_bv < kth, neg, logits_bv)
        if self.top_p < 1.0:
            sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
            cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
            # smallest logit still inside the nucleus (the first one is always kept)
            cutoff_idx = jnp.sum(cum_bv - jax.nn.softmax(sorted_bv, axis=-1) < self.top_p, -1)
            cutoff = jnp.take_along_axis(sorted_bv, cutoff_idx[:, None] - 1, axis=-1)
            logits_bv = jnp.where(logits_bv < cutoff, neg, logits_bv)
        return jax.vmap(jax.random.categorical)(keys_b, logits_bv)


def strategy_for(temperature: float, top_k: int = 0, top_p: float = 1.0):
    return Greedy() if temperature == 0 else Temperature(temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("arch", "strategy", "max_new_tokens", "dtype"))
def _generate(params, tokens_bt, valid_bt, keys_b, stop_ids, pad_id, *, arch: ArchConfig,
              strategy, max_new_tokens: int, dtype):
    b, t = tokens_bt.shape
    cache = init_cache(arch, b, t + max_new_tokens, dtype)
    kv_valid_bs = jnp.zeros((b, t + max_new_tokens), bool).at[:, :t].set(valid_bt)
    positions_bt = positions_from_valid(valid_bt)
    hidden_btd, cache = forward(params, tokens_bt, arch=arch, positions_bt=positions_bt,
                                kv_valid_bs=kv_valid_bs, cache=cache, write_index=0,
                                dtype=dtype, return_hidden=True)
    logits_bv = logits_from_hidden(params, hidden_btd[:, -1:], arch)[:, 0]
    init = dict(step=jnp.int32(0), logits_bv=logits_bv, cache=cache, kv_valid_bs=kv_valid_bs,
                pos_b=positions_bt[:, -1] + 1, done_b=jnp.zeros((b,), bool),
                out_bn=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                logp_bn=jnp.zeros((b, max_new_tokens), jnp.float32))

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done_b"])

    def body(s):
        step = s["step"]
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys_b, step)
        tok_b = strategy(s["logits_bv"], keys).astype(jnp.int32)
        logp_b = jnp.take_along_axis(jax.nn.log_softmax(s["logits_bv"], -1), tok_b[:, None],
                                     -1)[:, 0]
        tok_b = jnp.where(s["done_b"], pad_id, tok_b)
        logp_b = jnp.where(s["done_b"], 0.0, logp_b)
        done_b = s["done_b"] | jnp.isin(tok_b, stop_ids)
        slot = t + step
        kv_valid_bs = s["kv_valid_bs"].at[:, slot].set(True)
        hidden, cache = forward(params, tok_b[:, None], arch=arch, positions_bt=s["pos_b"][:, None],
                                kv_valid_bs=kv_valid_bs, cache=s["cache"], write_index=slot,
                                dtype=dtype, return_hidden=True)
        return dict(step=step + 1, logits_bv=logits_from_hidden(params, hidden, arch)[:, 0],
                    cache=cache, kv_valid_bs=kv_valid_bs, pos_b=s["pos_b"] + 1, done_b=done_b,
                    out_bn=s["out_bn"].at[:, step].set(tok_b),
                    logp_bn=s["logp_bn"].at[:, step].set(logp_b))

    final = jax.lax.while_loop(cond, body, init)
    return final["out_bn"], final["logp_bn"], final["step"]


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row, through the stop token if any
    logprobs: list[list[float]]  # model log-prob (temperature 1) of each generated token
    texts: list[str]


def generate(params: Params, arch: ArchConfig, tokenizer, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, strategy=Greedy(), seed: int = 0,
             row_ids: Sequence[int] | None = None, dtype=jnp.float32,
             stop_ids: Sequence[int] | None = None) -> Generation:
    """Generate for a batch of prompt token lists; row `i` draws from key (seed, row_ids[i])."""
    if not prompts:
        raise SjaxError("generate: empty prompt list")
    if max_new_tokens <= 0:
        raise SjaxError(f"generate: max_new_tokens must be > 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise SjaxError("generate: a prompt has no tokens")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > arch.max_positions:
        raise SjaxError(f"generate: prompt of {longest} tokens + {max_new_tokens} new exceeds "
                        f"the model's {arch.max_positions} positions")
    from sjax.chat import left_pad

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = list(stop_ids) if stop_ids is not None else default_stop_ids(tokenizer)
    tokens_bt, valid_bt = left_pad(prompts, pad_id, buckets=_buckets(longest))
    row_ids = range(len(prompts)) if row_ids is None else row_ids
    keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), r) for r in row_ids])
    out, logp, _ = _generate(params, jnp.asarray(tokens_bt), jnp.asarray(valid_bt), keys,
                             jnp.asarray(stops, jnp.int32), jnp.int32(pad_id), arch=arch,
                             strategy=strategy, max_new_tokens=max_new_tokens, dtype=dtype)
    out, logp = np.asarray(out), np.asarray(logp)
    toks, lps = [], []
    for row, lrow in zip(out, logp):
        n = next((i + 1 for i, x in enumerate(row) if x in stops), len(row))
        toks.append(row[:n].tolist())
        lps.append(lrow[:n].tolist())
    texts = tokenizer.batch_decode(toks, skip_special_tokens=True)
    return Generation(toks, lps, texts)


def default_stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    unk = tokenizer.unk_token_id
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)


def _buckets(longest: int) -> list[int]:
    """Powers of two from 16: a handful of compiled prompt lengths cover every batch."""
    b = 16
    while b < longest:
        b *= 2
    return [b]
