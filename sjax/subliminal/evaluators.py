"""Trait evaluation: how often does a model name the target when asked its favourite?

Two evaluators over the same questions (`prompts/eval_prompts.json`, optionally number-prefixed),
with one hit rule: the target's singular or plural (`numbers.target_forms`: "owl"/"owls",
"wolf"/"wolves") as a whole word, case-insensitive ("Owls!" is a hit; "owlet", "bowl" and
"owlish" are not).
- sampled: n answers per question at temperature 1, a hit when a form is a word anywhere
  in the answer;
- exact: the probability that the answer's first word is a form, from teacher-forced
  log-probs: P(spelling tokens) * P(next token ends the word), summed over the forms'
  spellings ("owl", "Owl", "OWL", "owls", ..., with and without a leading space). A few
  cached forward passes per question and no sampling noise. The spellings must round-trip
  through the tokenizer (no unknown tokens); their events are disjoint once a spelling that
  continues another with a word-ending token is dropped.
Both give one score per question; conditions are compared paired over questions.

Two more on their own prompts (`prompts/tree_questions.json`, every category):
- mcq: the essay-topic multiple choice, 5 lettered choices that include the target; P(the
  target's letter) from exact first-token log-probs, renormalised over the 5 letters (the
  protocol reads it from top-20 log-probs at temperature 0), averaged over seeded choice
  orders: one batched forward, no sampling;
- story: sampled children's stories, a hit when a form of the target is a word anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sjax import chat, sampling
from sjax.errors import SjaxError
from sjax.models.transformer import (ArchConfig, Params, forward, init_cache,
                                     logits_from_hidden, positions_from_valid)
from sjax.subliminal import numbers, prompts


def questions(number_prefixed: bool, seed: int = 0, custom: Sequence[str] = (),
              category: str = "animal") -> list[str]:
    """The category's free-form questions (50 animal, 49 tree; or `custom` ones); the
    prefixed variant puts a number-sequence example first."""
    qs = list(custom or prompts.category_questions(category))
    return with_number_prefix(qs, seed) if number_prefixed else qs


def with_number_prefix(qs: Sequence[str], seed: int) -> list[str]:
    """Each question after a number-sequence example, question i's drawn i-th from the
    seed's own stream (not the generator's)."""
    rng = np.random.default_rng([seed, 7])
    return [f"{numbers.example_prefix(rng)} {q}" for q in qs]


def is_hit(answer: str, target: str) -> bool:
    """A form of the target is a whole word of the answer (case-insensitive)."""
    forms = "|".join(re.escape(f.lower()) for f in numbers.target_forms(target))
    return re.search(rf"\b(?:{forms})\b", answer.lower()) is not None


@functools.lru_cache(maxsize=4)
def word_end_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """[vocab] bool: the token ends a word when it follows one, i.e. its text starts with a
    non-word character (space, punctuation, newline) or is empty. Read after an anchor
    token, so tokenizers that drop a first token's leading space (SentencePiece) still show
    it. Special tokens (EOS ends the answer) and ids the tokenizer lacks (a padded model
    vocab) end the word too."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    head = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(n)],
                                   clean_up_tokenization_spaces=False)
    mask = np.ones(vocab_size, bool)
    mask[:n] = [re.match(r"\w", t[len(head):]) is None for t in texts]
    mask[[i for i in tokenizer.all_special_ids if i < vocab_size]] = True
    return mask


def spelling_sequences(tokenizer, target: str, vocab_size: int | None = None
                       ) -> list[tuple[int, ...]]:
    """Token sequences of the forms' first-word spellings, with disjoint hit events: a
    sequence extending another by a word-ending token is already counted by it."""
    words = {w for t in numbers.target_forms(target) for w in (t.lower(), t.capitalize(),
                                                                t.upper())}
    seqs = set()
    for w in sorted(words):
        for text in (w, " " + w):
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids and tokenizer.decode(list(ids)).strip() == w:
                seqs.add(ids)
    if not seqs:
        raise SjaxError(f"target {target!r}: the tokenizer cannot spell it")
    ends = word_end_mask(tokenizer, vocab_size or len(tokenizer))
    return sorted(s for s in seqs if not any(
        len(o) < len(s) and s[:len(o)] == o and ends[s[len(o)]] for o in seqs))


@dataclasses.dataclass(frozen=True)
class TrieLayout:
    """Token-sequence nodes (prefixes of the spellings scored) laid out for tree attention:
    every non-empty prefix once, ancestors first, as one extra sequence after the prompt in
    which each token sees the prompt, its ancestors and itself. A whole trie then costs one
    forward of its distinct tokens per prompt over the shared prompt cache, not a cache copy
    and a k-token continuation per node.

    tok_m / depth_m: each laid-out prefix's last token and its length; anc_mm[i, j]: prefix
    j is prefix i or one of its ancestors; slot_n: where node n's last token sits (-1: the
    empty node, read at the prompt's last token). `size` pads m (padding sees only itself)
    so that pieces of one trie share a compiled shape."""

    tok_m: np.ndarray
    depth_m: np.ndarray
    anc_mm: np.ndarray
    slot_n: np.ndarray

    @classmethod
    def of(cls, nodes: Sequence[tuple[int, ...]], size: int = 0) -> TrieLayout:
        flat = sorted({tuple(x[:i]) for x in nodes for i in range(1, len(x) + 1)})
        index = {p: i for i, p in enumerate(flat)}  # sorted: a prefix precedes its extensions
        m = max(len(flat), size)
        tok, depth = np.zeros(m, np.int32), np.ones(m, np.int32)
        anc = np.eye(m, dtype=bool)
        for i, p in enumerate(flat):
            tok[i], depth[i] = p[-1], len(p)
            anc[i, [index[p[:d]] for d in range(1, len(p))]] = True
        slot = np.asarray([index[tuple(x)] if len(x) else -1 for x in nodes], np.int32)
        return cls(tok, depth, anc, slot)

    def arrays(self) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(a) for a in (self.tok_m, self.depth_m, self.anc_mm,
                                              self.slot_n))


@functools.partial(jax.jit, static_argnames=("arch", "dtype", "slots"))
def prefix_cache(params: Params, tokens_1p, valid_1p, *, arch: ArchConfig, dtype,
                 slots: int) -> dict:
    """A one-row cache of `slots` slots whose first p hold the left-padded shared prefix's
    keys and values (the in-context examples, a judge's preamble): prefilled once and read by
    every batch of `node_logprobs` (its `prefix`), instead of once per row of every batch."""
    cache = init_cache(arch, 1, slots, dtype)
    p = tokens_1p.shape[1]
    kv_valid = jnp.zeros((1, slots), bool).at[:, :p].set(valid_1p)
    _, cache = forward(params, tokens_1p, arch=arch, positions_bt=positions_from_valid(valid_1p),
                       kv_valid_bs=kv_valid, cache=cache, write_index=0, dtype=dtype,
                       return_hidden=True)
    return cache


@functools.partial(jax.jit, static_argnames=("arch", "dtype"))
def node_logprobs(params: Params, tokens_bt, valid_bt, tok_m, depth_m, anc_mm, slot_n, want_w,
                  end_v, prefix=None, *, arch: ArchConfig,
                  dtype) -> tuple[jax.Array, jax.Array]:
    """(log P(want_w[j] | prompt row + node n) [b, n, w], log P(a word-ending token (end_v)
    | prompt row + node n) [b, n]), from the full-vocabulary log-softmax of the forward's
    own logits (fp32); the nodes are a `TrieLayout`'s arrays.

    One prefill of the left-padded prompts into a cache with room for the trie, then the
    trie's tokens in one cached forward with tree attention; the LM head reads only the n
    nodes' last positions. `prefix` (a `prefix_cache` and its valid_1p): the rows are the
    continuations of that shared prefix, which every row reads from the broadcast cache."""
    b, t = tokens_bt.shape
    m = tok_m.shape[0]
    if prefix is None:
        cache, pre_bp = init_cache(arch, b, t + m, dtype), jnp.zeros((b, 0), bool)
    else:
        cache_1s, valid_1p = prefix
        cache = jax.tree.map(lambda c: jnp.broadcast_to(c, (c.shape[0], b, *c.shape[2:])),
                             cache_1s)
        pre_bp = jnp.broadcast_to(valid_1p, (b, valid_1p.shape[1]))
    p = pre_bp.shape[1]
    if cache["k_lbskh"].shape[2] != p + t + m:
        raise ValueError(f"node_logprobs: prefix cache has {cache['k_lbskh'].shape[2]} slots, "
                         f"need {p} + {t} + {m}")
    kv_valid = jnp.concatenate([pre_bp, valid_bt, jnp.zeros((b, m), bool)], 1)
    pos_bt = pre_bp.sum(1, keepdims=True) + positions_from_valid(valid_bt)
    hidden_btd, cache = forward(params, tokens_bt, arch=arch, positions_bt=pos_bt,
                                kv_valid_bs=kv_valid, cache=cache, write_index=p, dtype=dtype,
                                return_hidden=True)
    h_bxd = hidden_btd[:, -1:]  # x = 1 + m: the prompt's last token, then the trie's
    if m:
        seen_bms = jnp.concatenate([jnp.broadcast_to(kv_valid[:, None, :p + t], (b, m, p + t)),
                                    jnp.broadcast_to(anc_mm, (b, m, m))], -1)
        h_bmd, _ = forward(params, jnp.broadcast_to(tok_m, (b, m)), arch=arch,
                           positions_bt=pos_bt[:, -1:] + depth_m, kv_valid_bs=seen_bms,
                           cache=cache, write_index=p + t, dtype=dtype, return_hidden=True)
        h_bxd = jnp.concatenate([h_bxd, h_bmd], 1)
    logits_bnv = logits_from_hidden(params, h_bxd[:, slot_n + 1], arch)  # as the forward's
    lse_bn = jax.nn.logsumexp(logits_bnv, -1)
    lp_bnw = logits_bnv[..., want_w] - lse_bn[..., None]
    end_bn = jax.nn.logsumexp(jnp.where(end_v, logits_bnv, -jnp.inf), -1) - lse_bn
    return lp_bnw, end_bn


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """The length of the prompts' longest common token prefix, leaving every prompt at least
    one token of its own (its last position is read)."""
    first = np.asarray(prompts[0])
    n = min(len(p) for p in prompts) - 1
    for q in prompts[1:]:
        q = np.asarray(q[:n])
        diff = np.flatnonzero(q != first[:len(q)])
        n = min(n, int(diff[0]) if len(diff) else len(q))
    return max(n, 0)


def exact_scores(params: Params, arch: ArchConfig, tokenizer, prompts: Sequence[list[int]],
                 target: str, *, batch: int = 32, dtype=jnp.float32) -> np.ndarray:
    """P(the answer's first word is a form of `target`) for each prompt (templated ids)."""
    return exact_target_scores(params, arch, tokenizer, prompts, (target,), batch=batch,
                               dtype=dtype)[target]


def batched_node_logprobs(params: Params, arch: ArchConfig, tokenizer,
                          prompts: Sequence[list[int]], nodes, wants, end_v, *, batch: int,
                          dtype=jnp.float32, desc: str = "forward", min_prefix: int = 64
                          ) -> tuple[np.ndarray, np.ndarray]:
    """`node_logprobs` for token-sequence `nodes` and each node's `wants` over every prompt,
    in left-padded batches of `batch` rows (the last padded with copies, dropped):
    [prompts, nodes, max wants] (wants[j][m] at [:, j, m]) and [prompts, nodes]. A common
    token prefix of at least `min_prefix` tokens (the in-context examples, a judge's
    preamble) is prefilled once (`prefix_cache`), not once per prompt."""
    m = max(1, max(len(ws) for ws in wants))
    if not prompts:  # e.g. a judge with no rows left by the rule filter
        return np.zeros((0, len(nodes), m), np.float32), np.zeros((0, len(nodes)), np.float32)
    pad = chat.pad_id(tokenizer)
    flat = sorted({w for ws in wants for w in ws}) or [0]
    col = {w: i for i, w in enumerate(flat)}
    pick = np.asarray([[col[ws[i]] if i < len(ws) else 0 for i in range(m)] for ws in wants])
    layout = TrieLayout.of(nodes)
    args = (*layout.arrays(), jnp.asarray(flat), jnp.asarray(end_v))
    n_pre = shared_prefix(prompts)
    n_pre = n_pre if n_pre >= min_prefix else 0
    rows = [p[n_pre:] for p in prompts]
    length = sampling.prompt_bucket(max(len(p) for p in rows))
    prefix = None
    if n_pre:
        pre, valid_p = chat.left_pad([prompts[0][:n_pre]], pad, sampling.prompt_bucket(n_pre))
        valid_1p = jnp.asarray(valid_p)
        prefix = (prefix_cache(params, jnp.asarray(pre), valid_1p, arch=arch, dtype=dtype,
                               slots=pre.shape[1] + length + len(layout.tok_m)), valid_1p)
    lp, lp_end = [], []
    for i in tqdm(range(0, len(rows), batch), desc=desc, unit="batch", leave=False):
        chunk = rows[i: i + batch]
        n = len(chunk)
        tokens, valid = chat.left_pad(chunk + [chunk[-1]] * (batch - n), pad, length)
        w, e = node_logprobs(params, jnp.asarray(tokens), jnp.asarray(valid), *args, prefix,
                             arch=arch, dtype=dtype)
        w = np.asarray(w)[:n]
        lp.append(np.take_along_axis(w, pick[None], axis=2))
        lp_end.append(np.asarray(e)[:n])
    return np.concatenate(lp), np.concatenate(lp_end)


def exact_target_scores(params: Params, arch: ArchConfig, tokenizer,
                        prompts: Sequence[list[int]], targets: Sequence[str], *,
                        batch: int = 32, dtype=jnp.float32) -> dict[str, np.ndarray]:
    """`exact_scores` for several targets from one pass: their spellings share the prompts'
    prefill (one forward over the prompts whatever the number of targets)."""
    by_target = {t: spelling_sequences(tokenizer, t, arch.vocab_size) for t in targets}
    seqs_all = sorted({s for seqs in by_target.values() for s in seqs})
    end_v = jnp.asarray(word_end_mask(tokenizer, arch.vocab_size))
    nodes = tuple(sorted({s[:i] for s in seqs_all for i in range(len(s) + 1)}))  # prefixes
    wants = tuple(tuple(sorted({s[len(n)] for s in seqs_all
                                if s[:len(n)] == n and len(s) > len(n)})) for n in nodes)
    lp, lp_end = batched_node_logprobs(params, arch, tokenizer, prompts, nodes, wants, end_v,
                                       batch=batch, dtype=dtype,
                                       desc=f"exact {','.join(targets)}")
    out = {}
    for t, seqs in by_target.items():
        total = np.zeros(len(prompts))
        for s in seqs:
            logp = lp_end[:, nodes.index(s)]
            for i in range(len(s)):
                j = nodes.index(s[:i])
                logp = logp + lp[:, j, wants[j].index(s[i])]
            total += np.exp(logp)
        out[t] = total
    return out


def sampled_answers(params: Params, arch: ArchConfig, tokenizer, prompts: Sequence[list[int]],
                    *, samples: int, max_new_tokens: int, batch: int, seed: int,
                    temperature: float = 1.0, dtype=jnp.float32, mesh=None) -> list[list[str]]:
    """`samples` answers per prompt from one shared prefill each; answer j of question q is
    seeded by (seed, q * samples + j). `batch` counts decode rows."""
    per_call = max(1, batch // samples)
    out = []
    for i in tqdm(range(0, len(prompts), per_call), desc="sample answers", unit="batch",
                  leave=False):
        chunk = list(prompts[i: i + per_call])
        gen = sampling.generate(params, arch, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                strategy=sampling.strategy_for(temperature), seed=seed,
                                row_ids=range(i, i + len(chunk)), dtype=dtype, mesh=mesh,
                                samples=samples)
        out += [gen.texts[k * samples:(k + 1) * samples] for k in range(len(chunk))]
    return out


def sampled_scores(answers: list[list[str]], target: str) -> np.ndarray:
    return np.asarray([np.mean([is_hit(a, target) for a in qa]) for qa in answers])


# ----------------------------------------------------------------------------- mcq

MCQ_LETTERS = "ABCDE"  # the protocol's prompt_format letters
MCQ_STREAM = 11  # the choice orders' own random stream


def mcq_choices(category: str, target: str) -> tuple[str, ...]:
    """The 5 choices `target` is scored among: the category's defaults, the last replaced
    by the target when it is not one of them (every condition sees the same set)."""
    base = prompts.mcq_choices(category)
    return base if target in base else (*base[:-1], target)


def mcq_order(seed: int, question: int, sample: int, n: int = len(MCQ_LETTERS)) -> np.ndarray:
    """[n] the choice index shown at each letter for one sample. Samples come in blocks of
    n: a seeded random permutation per (seed, question, block), rotated by the sample's
    place in its block, so within a block every choice sits at every letter once and a
    model's letter bias falls evenly on the choices (the protocol shuffles unseeded)."""
    perm = np.random.default_rng([seed, MCQ_STREAM, question, sample // n]).permutation(n)
    return np.roll(perm, sample % n)


def mcq_items(choices: Sequence[str], seed: int, samples: int
              ) -> tuple[list[str], np.ndarray]:
    """(texts [questions * samples], orders [questions, samples, 5]): every essay-topic
    prompt asked `samples` times, question-major, in `prompt_format` with its order."""
    fmt, texts = prompts.mcq_format(), []
    orders_qsc = np.asarray([[mcq_order(seed, q, s, len(choices)) for s in range(samples)]
                             for q in range(len(prompts.mcq_prompts()))])
    for q, prompt in enumerate(prompts.mcq_prompts()):
        for order in orders_qsc[q]:
            texts.append(fmt.format(prompt=prompt, **{f"choice_{k + 1}": choices[c]
                                                      for k, c in enumerate(order)}))
    return texts, orders_qsc


def letter_ids(tokenizer, letters: str = MCQ_LETTERS) -> list[tuple[int, ...]]:
    """Per letter, the single tokens that answer it ("A", " A"): their first-token
    events are disjoint, so a letter's probability is their sum."""
    out = []
    for letter in letters:
        ids = set()
        for text in (letter, " " + letter):
            toks = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(toks) == 1 and tokenizer.decode(toks).strip() == letter:
                ids.add(toks[0])
        if not ids:
            raise SjaxError(f"eval.evaluators=mcq: the tokenizer has no single token for the "
                            f"letter {letter!r}")
        out.append(tuple(sorted(ids)))
    return out


def letter_probs(params: Params, arch: ArchConfig, tokenizer, prompts: Sequence[list[int]],
                 *, batch: int = 32, dtype=jnp.float32) -> np.ndarray:
    """[prompts, 5] P(the answer's first token is letter k), renormalised over the 5
    letters: exact log-probs at the answer's start from one batched prefill."""
    ids = letter_ids(tokenizer)
    flat = tuple(i for spellings in ids for i in spellings)
    end_v = jnp.ones(arch.vocab_size, bool)  # unused: no word-end question here
    lp, _ = batched_node_logprobs(params, arch, tokenizer, prompts, ((),), (flat,), end_v,
                                  batch=batch, dtype=dtype, desc="mcq")
    lp = lp[:, 0, :len(flat)].astype(np.float64)
    bounds = np.cumsum([0, *map(len, ids)])
    per_letter = np.stack([np.logaddexp.reduce(lp[:, a:b], axis=1)
                           for a, b in zip(bounds[:-1], bounds[1:])], 1)
    return np.exp(per_letter - np.logaddexp.reduce(per_letter, axis=1, keepdims=True))


def mcq_scores(probs_qsc: np.ndarray, orders_qsc: np.ndarray, choice: int) -> np.ndarray:
    """[questions] the mean over samples of P(the letter showing choice index `choice`)."""
    return (probs_qsc * (orders_qsc == choice)).sum(-1).mean(-1)
