"""Batched generation: one jitted prefill, then one jitted `lax.while_loop` of decode steps.

Prompts are left-padded so every row's next token lands in the same cache slot; the loop
carries a `DecodeState` (cache, last logits, finished flags, outputs) and never returns to the
host until every row has hit a stop token or `max_new_tokens`. Randomness comes from one key
per row folded with the step number, so a row's sample does not depend on its batch position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tqdm.auto import tqdm

from sjax import distributed
from sjax.chat import left_pad
from sjax.chat import pad_id as chat_pad_id
from sjax.errors import SjaxError
from sjax.jsonl import read_done_ids
from sjax.models.transformer import (ArchConfig, Params, forward, init_cache,
                                     logits_from_hidden, positions_from_valid)
from sjax.sharding import batch_sharding, batch_shards, global_array, to_host
from sjax.writer import Writer


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


def strategy_for(temperature: float):
    """Greedy at temperature 0 (the configs' `temperature` keys), else plain sampling."""
    return Greedy() if temperature == 0 else Temperature(temperature)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's carry: `prefill` builds it, each `decode_loop` step replaces it."""

    step: jax.Array  # int32 scalar: tokens generated so far (the next output column)
    logits_bv: jax.Array  # fp32 next-token logits of each row
    cache: dict  # the KV cache (`init_cache`): k_lbskh, v_lbskh
    kv_valid_bs: jax.Array  # bool: cache slots holding a real token
    pos_b: jax.Array  # int32: the position id of each row's next token
    done_b: jax.Array  # bool: the row has emitted a stop token
    out_bn: jax.Array  # int32: generated tokens (pad after a row is done)
    grammar: Any = None  # the constraint's per-row state, None when unconstrained


@functools.partial(jax.jit, static_argnames=("arch", "max_new_tokens", "dtype", "samples"))
def prefill(params, tokens_bt, valid_bt, pad_id, constraint, *, arch: ArchConfig,
            max_new_tokens: int, dtype, samples: int = 1) -> DecodeState:
    """The prompts' forward pass into a fresh cache: the decode loop's starting state."""
    b, t = tokens_bt.shape
    cache = init_cache(arch, b, t + max_new_tokens, dtype)
    kv_valid_bs = jnp.zeros((b, t + max_new_tokens), bool).at[:, :t].set(valid_bt)
    positions_bt = positions_from_valid(valid_bt)
    hidden_btd, cache = forward(params, tokens_bt, arch=arch, positions_bt=positions_bt,
                                kv_valid_bs=kv_valid_bs, cache=cache, write_index=0,
                                dtype=dtype, return_hidden=True)
    logits_bv = logits_from_hidden(params, hidden_btd[:, -1:], arch)[:, 0]
    if samples > 1:  # one prefill per prompt, then `samples` decode rows share its cache
        cache = jax.tree.map(lambda c: jnp.repeat(c, samples, axis=1), cache)
        kv_valid_bs, positions_bt, logits_bv = (jnp.repeat(x, samples, axis=0) for x in
                                                (kv_valid_bs, positions_bt, logits_bv))
        b = b * samples
    return DecodeState(step=jnp.int32(0), logits_bv=logits_bv, cache=cache,
                       kv_valid_bs=kv_valid_bs, pos_b=positions_bt[:, -1] + 1,
                       done_b=jnp.zeros((b,), bool),
                       out_bn=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                       grammar=None if constraint is None else constraint.init_state(b))


@functools.partial(jax.jit, static_argnames=("arch", "strategy", "dtype"))
def decode_loop(params, state: DecodeState, keys_b, stop_ids, pad_id, constraint, *,
                arch: ArchConfig, strategy, dtype) -> DecodeState:
    """Decode steps from `prefill`'s state until every row is done or its output is full."""
    max_new_tokens = state.out_bn.shape[1]
    t = state.kv_valid_bs.shape[1] - max_new_tokens

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done_b)

    def body(s: DecodeState) -> DecodeState:
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys_b, s.step)
        logits_bv = s.logits_bv
        if constraint is not None:
            allowed_bv = constraint.allowed(s.grammar)
            logits_bv = jnp.where(allowed_bv, logits_bv, jnp.finfo(logits_bv.dtype).min)
        tok_b = jnp.where(s.done_b, pad_id, strategy(logits_bv, keys).astype(jnp.int32))
        slot = t + s.step
        kv_valid_bs = s.kv_valid_bs.at[:, slot].set(True)
        hidden, cache = forward(params, tok_b[:, None], arch=arch, positions_bt=s.pos_b[:, None],
                                kv_valid_bs=kv_valid_bs, cache=s.cache, write_index=slot,
                                dtype=dtype, return_hidden=True)
        return DecodeState(
            step=s.step + 1, logits_bv=logits_from_hidden(params, hidden, arch)[:, 0],
            cache=cache, kv_valid_bs=kv_valid_bs, pos_b=s.pos_b + 1,
            done_b=s.done_b | jnp.isin(tok_b, stop_ids), out_bn=s.out_bn.at[:, s.step].set(tok_b),
            grammar=None if constraint is None else constraint.advance(s.grammar, tok_b))

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("arch", "strategy", "max_new_tokens", "dtype",
                                             "samples"))
def generate_ids(params, tokens_bt, valid_bt, keys_b, stop_ids, pad_id, constraint, *,
                 arch: ArchConfig, strategy, max_new_tokens: int, dtype, samples: int = 1):
    """`prefill` then `decode_loop` in one program: (out_bn, steps run)."""
    state = prefill(params, tokens_bt, valid_bt, pad_id, constraint, arch=arch,
                    max_new_tokens=max_new_tokens, dtype=dtype, samples=samples)
    final = decode_loop(params, state, keys_b, stop_ids, pad_id, constraint, arch=arch,
                        strategy=strategy, dtype=dtype)
    return final.out_bn, final.step


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row, through the stop token if any
    texts: list[str]


def generate(params: Params, arch: ArchConfig, tokenizer, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, strategy=Greedy(), seed: int = 0,
             row_ids: Sequence[int] | None = None, dtype=jnp.float32,
             stop_ids: Sequence[int] | None = None, constraint=None, mesh=None,
             samples: int = 1) -> Generation:
    """Generate for a batch of prompt token lists; row `i` draws from key (seed, row_ids[i]).

    `samples` > 1 draws that many continuations per prompt from one shared prefill (rows
    prompt-major; continuation j of prompt i uses key (seed, row_ids[i] * samples + j)).
    With a `mesh`, the batch is split over its data x fsdp axes (padded with copies of the
    last row to a multiple of their size; the copies are dropped).
    """
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
    n = len(prompts)
    row_ids = list(range(n) if row_ids is None else row_ids)
    prompts = list(prompts)
    if mesh is not None:
        extra = -n % batch_shards(mesh)
        prompts += [prompts[-1]] * extra
        row_ids += [row_ids[-1]] * extra
    pad_id = chat_pad_id(tokenizer)
    stops = list(stop_ids) if stop_ids is not None else default_stop_ids(tokenizer)
    tokens_bt, valid_bt = left_pad(prompts, pad_id, prompt_bucket(longest))
    key_ids = (row_ids if samples == 1 else
               [r * samples + j for r in row_ids for j in range(samples)])
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(
        jnp.asarray(key_ids, jnp.uint32))
    batch_args = (jnp.asarray(tokens_bt), jnp.asarray(valid_bt), keys)
    if mesh is not None:  # global arrays: each process puts only its own devices' rows
        tokens, valid = (global_array(a, batch_sharding(mesh, 2)) for a in (tokens_bt, valid_bt))
        key_data = np.asarray(jax.random.key_data(keys))
        batch_args = (tokens, valid, jax.random.wrap_key_data(
            global_array(key_data, batch_sharding(mesh, key_data.ndim))))
    out, _ = generate_ids(params, *batch_args, jnp.asarray(stops, jnp.int32),
                          jnp.int32(pad_id), constraint, arch=arch, strategy=strategy,
                          max_new_tokens=max_new_tokens, dtype=dtype, samples=samples)
    stop_set = set(stops)
    toks = []
    for row in to_host(out)[:n * samples]:
        k = next((i + 1 for i, x in enumerate(row) if x in stop_set), len(row))
        toks.append(row[:k].tolist())
    texts = tokenizer.batch_decode(toks, skip_special_tokens=True)
    return Generation(toks, texts)


def generate_jsonl(path, rows: Sequence[dict], params: Params, arch: ArchConfig, tokenizer, *,
                   batch_size: int, max_new_tokens: int, strategy=Greedy(), seed: int = 0,
                   dtype=jnp.float32, constraint=None, mesh=None,
                   desc: str = "generate") -> int:
    """Stream `rows` ({'id': int, 'prompt_ids': [...], ...}) through `generate` in batches.

    Each finished batch is appended to `path` as JSONL ({..row without prompt_ids,
    'completion', 'n_tokens'}) and flushed; a rerun skips ids already in the
    file (a torn last line from a crash is dropped), so a killed job resumes where it was
    and, rows being seeded by id, writes exactly what an uninterrupted run would have.
    Returns the number of rows generated by this call. Across hosts every process runs
    every batch (each computes its devices' rows) and only process 0 touches the file; the
    run folder must then be on a filesystem all hosts share.
    """
    path, writer = Path(path), Writer()
    main = writer.main
    done = read_done_ids(path) if main else set()  # read (and a torn tail cut) by process 0
    todo_mask = distributed.from_main(np.asarray([r["id"] not in done for r in rows], bool))
    todo = [r for r, t in zip(rows, todo_mask) if t]
    with writer.appending(path) as f, tqdm(
            total=len(rows), initial=len(rows) - len(todo), desc=desc, unit="row",
            disable=not main) as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            gen = generate(params, arch, tokenizer, [r["prompt_ids"] for r in chunk],
                           max_new_tokens=max_new_tokens, strategy=strategy, seed=seed,
                           row_ids=[r["id"] for r in chunk], dtype=dtype,
                           constraint=constraint, mesh=mesh)
            if main:
                for r, text, toks in zip(chunk, gen.texts, gen.tokens):
                    out = {k: v for k, v in r.items() if k != "prompt_ids"}
                    out |= {"completion": text, "n_tokens": len(toks)}
                    f.write(json.dumps(out) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(chunk))
    return len(todo)


def default_stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    unk = tokenizer.unk_token_id
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)


def prompt_bucket(longest: int) -> int:
    """The padded prompt length for a batch whose longest prompt has `longest` tokens: powers
    of two up to 64, then multiples of 32, so a handful of compiled prompt lengths cover
    every batch and long prompts waste at most 32 padded positions each."""
    b = 16
    while b < min(longest, 64):
        b *= 2
    return b if longest <= b else -(-longest // 32) * 32
