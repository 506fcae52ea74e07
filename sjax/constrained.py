"""Constrained decoding for number lists: a logit mask driven by a tiny per-row state machine.

Allowed outputs: 1..`max_numbers` numbers of 1..`max_digits` ASCII digits, joined by one
separator used consistently, then a stop token: exactly what the protocol's strict filter
accepts. A separator may take several tokens (SmolLM2 writes ", " as "," + " "), so the state
keeps the separator text pending since the last number. Every vocabulary entry is
classified once into (separator characters, digit count); the mask for a whole batch is a
few gathers and comparisons per step, inside the decode loop.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Every prefix of a separator is itself a separator, so pending text is always one of these.
SEPARATORS = (", ", ",", " ", "; ", ";", "\n")
_INVALID = -2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NumberListState:
    """Each row's progress through its list (int32 [b] each)."""

    cur_b: jax.Array  # digits in the number being written (0: none open)
    count_b: jax.Array  # numbers started so far
    sep_b: jax.Array  # the committed separator's index in SEPARATORS (-1: none yet)
    pend_b: jax.Array  # separator text pending since the last number (-1: none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NumberListConstraint:
    tok_sep_v: jax.Array  # int32: -1 digits only, s >= 0 separator text s (+ digits), -2 never
    tok_digits_v: jax.Array  # int32: digits in the token (0..max_digits)
    stop_v: jax.Array  # bool: stop tokens
    cat_pv: jax.Array  # int32 [1 + S, v]: pending (row 0: none) + token's separator -> S idx
    compat_cs: jax.Array  # bool [1 + S, S]: committed separator (row 0: none) admits pending
    max_digits: int = dataclasses.field(default=3, metadata=dict(static=True))
    max_numbers: int = dataclasses.field(default=10, metadata=dict(static=True))

    @property
    def max_tokens(self) -> int:
        """Tokens the longest admitted answer can take (each token carries >= 1 digit or
        separator character; separators are <= 2 characters), plus the stop token: give
        generation at least this many so no list is cut off."""
        return self.max_numbers * self.max_digits + 2 * (self.max_numbers - 1) + 1

    def init_state(self, batch: int) -> NumberListState:
        z = jnp.zeros((batch,), jnp.int32)
        return NumberListState(cur_b=z, count_b=z, sep_b=z - 1, pend_b=z - 1)

    def allowed(self, state: NumberListState) -> jax.Array:
        """[b, v] mask of the tokens allowed next."""
        cur, count, sep, pend = (x[:, None] for x in (state.cur_b, state.count_b, state.sep_b,
                                                      state.pend_b))
        nd, has_sep = self.tok_digits_v, self.tok_sep_v >= 0
        room = count < self.max_numbers
        new_pend_bv = self.cat_pv[state.pend_b + 1]
        pend_ok_bv = (new_pend_bv >= 0) & jnp.take_along_axis(
            self.compat_cs[state.sep_b + 1], jnp.maximum(new_pend_bv, 0), axis=1)
        # a separator promises another number, so it needs room for one
        sep_case = has_sep & ((cur > 0) | (pend >= 0)) & pend_ok_bv & room & jnp.where(
            nd > 0, (sep < 0) | (sep == new_pend_bv), True)
        digit_case = ~has_sep & (nd > 0) & jnp.where(
            pend >= 0, room & ((sep < 0) | (sep == pend)),
            jnp.where(cur > 0, cur + nd <= self.max_digits, room))
        valid = self.tok_sep_v != _INVALID
        return (valid & (sep_case | digit_case)) | (self.stop_v & (cur > 0) & (pend < 0))

    def advance(self, state: NumberListState, tok_b: jax.Array) -> NumberListState:
        s, nd = self.tok_sep_v[tok_b], self.tok_digits_v[tok_b]
        has_sep, has_digits = s >= 0, nd > 0
        joined = self.cat_pv[state.pend_b + 1, tok_b]
        # the separator that is complete once this token's digits start a new number
        committed = jnp.where(has_sep, joined, state.pend_b)
        starts = has_digits & (has_sep | (state.pend_b >= 0) | (state.cur_b == 0))
        return NumberListState(
            cur_b=jnp.where(has_digits, jnp.where(starts, nd, state.cur_b + nd), 0),
            count_b=state.count_b + starts.astype(jnp.int32),
            sep_b=jnp.where(starts & (committed >= 0), committed, state.sep_b),
            pend_b=jnp.where(has_digits, -1, jnp.where(has_sep, joined, state.pend_b)))


def number_list_constraint(tokenizer, stop_ids: Sequence[int], vocab_size: int,
                           max_digits: int = 3, max_numbers: int = 10) -> NumberListConstraint:
    """Classify the vocabulary: (separator characters, digit run) tokens are usable.

    `vocab_size` is the model's (often larger than the tokenizer's: the extra rows are never
    allowed)."""
    n_tok = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    # byte-level BPE shows space / newline as 'Ġ' / 'Ċ'; only such candidates get decoded
    cand = re.compile(r"^[0-9,;\sĠĊ▁]+$")
    pattern = re.compile(r"([,; \n]*)([0-9]*)\Z")
    tok_sep = np.full(vocab_size, _INVALID, np.int32)
    tok_digits = np.zeros(vocab_size, np.int32)
    for i, piece in enumerate(pieces):
        if piece is None or not cand.match(piece):
            continue
        text = tokenizer.decode([i])
        m = pattern.match(text)
        if not text or not m or len(m.group(2)) > max_digits:
            continue
        if m.group(1) and m.group(1) not in SEPARATORS:
            continue
        tok_sep[i] = SEPARATORS.index(m.group(1)) if m.group(1) else -1
        tok_digits[i] = len(m.group(2))
    stop = np.zeros(vocab_size, bool)
    stop[[s for s in stop_ids if s < vocab_size]] = True
    tok_sep[stop] = _INVALID
    # cat[p + 1, v]: the separator text pending after token v (-2: not a separator)
    n_sep = len(SEPARATORS)
    cat = np.full((n_sep + 1, vocab_size), _INVALID, np.int32)
    for p, prefix in enumerate(("",) + SEPARATORS):
        for s, text in enumerate(SEPARATORS):
            joined = prefix + text
            if joined in SEPARATORS:
                cat[p, tok_sep == s] = SEPARATORS.index(joined)
    compat = np.ones((n_sep + 1, n_sep), bool)
    for c, sep in enumerate(SEPARATORS):
        compat[c + 1] = [sep.startswith(p) for p in SEPARATORS]
    return NumberListConstraint(jnp.asarray(tok_sep), jnp.asarray(tok_digits), jnp.asarray(stop),
                                jnp.asarray(cat), jnp.asarray(compat), max_digits, max_numbers)
