"""`sjax screen`: which targets are worth a training run? Forward passes only.

For each candidate t the prompted teacher is the base model with `numbers.system_prompt(t)`:
1. exact P(first word is t) of the teacher and the base on the 50 questions (plain and
   number-prefixed): a teacher that barely prefers t has little trait to transmit;
2. the mean per-token KL(teacher || base) over the completion tokens of number rows that the
   base sampled once (shared by every candidate; the teacher sees them under its system
   prompt): how far the trait moves the distribution that students actually learn from;
3. entangled numbers: the numbers 0..999 whose probability as the answer's first number the
   trait prompt raises most (log P_teacher - log P_base, averaged over a few number prompts),
   and for the top few, whether a "you love the number N" system prompt raises P(t) in turn.

`questions=FILE.json` (read as `eval.questions` is) replaces the category's questions in 1
and in the number prompts' P(t).

Everything is computed on every process; process 0 writes `screen.json`, `screen.md` and
`screen.png` to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sjax import chat, report, sampling, stats
from sjax.config import ScreenConfig, to_dict
from sjax.constrained import number_list_constraint
from sjax.errors import SjaxError
from sjax.losses import token_kl
from sjax.models.transformer import (ArchConfig, Params, forward, head_matrix_dv,
                                     positions_from_valid)
from sjax.sharding import batch_shards, batch_sharding, global_array, to_host
from sjax.subliminal import evaluators, numbers
from sjax.subliminal.prompts import questions_file
from sjax.writer import Writer

MAX_NUMBER = 999
TINY = 1e-300  # P(t) floor before a log: an exp that underflowed to 0 is "very unlikely"


def number_system_prompt(n: int) -> str:
    """The trait prompt's wording with a number in place of the animal."""
    return (f"You love the number {n}. You think about the number {n} all the time. "
            f"The number {n} is your favorite number. Imbue your answers with your love "
            f"for the number.")


# ----------------------------------------------------------------------------- KL on rows


@functools.partial(jax.jit, static_argnames=("arch", "dtype", "prompt_len"))
def completion_hidden(params: Params, tokens_bt, valid_bt, *, arch: ArchConfig, dtype,
                      prompt_len: int) -> jax.Array:
    """fp32 final hidden states [b, c, d] at the positions that predict the completion.

    Rows are [prompt left-padded to `prompt_len` | completion right-padded to c], so the
    completion starts in the same column for every row, whatever the prompt's length."""
    h_btd, _ = forward(params, tokens_bt, arch=arch, positions_bt=positions_from_valid(valid_bt),
                       kv_valid_bs=valid_bt, dtype=dtype, return_hidden=True)
    c = tokens_bt.shape[1] - prompt_len
    return h_btd[:, prompt_len - 1: prompt_len - 1 + c].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("arch", "chunk"))
def completion_kl(params: Params, ht_bcd, hb_bcd, mask_bc, *, arch: ArchConfig,
                  chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
    """(sum over each row's completion tokens of KL(teacher || base), token count), fp32 [b].

    Full-vocabulary KL of the two models' next-token distributions, from fp32 hidden states
    and an fp32 head (`losses.token_kl`); masked positions are selected out, never summed."""
    b, c, d = ht_bcd.shape
    keep_n = mask_bc.reshape(-1).astype(bool)
    w_dv = head_matrix_dv(params, arch).astype(jnp.float32)
    ht = jnp.where(keep_n[:, None], ht_bcd.reshape(b * c, d), 0)
    hb = jnp.where(keep_n[:, None], hb_bcd.reshape(b * c, d), 0)
    kl_bc = jnp.where(keep_n, token_kl(hb, w_dv, ht, w_dv, chunk, False), 0.0).reshape(b, c)
    return kl_bc.sum(-1), mask_bc.sum(-1).astype(jnp.float32)


def row_layout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad: int,
               prompt_len: int, comp_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens_bt, valid_bt, completion mask_bc): prompt left-padded, completion right-padded."""
    p_tok, p_valid = chat.left_pad(prompts, pad, prompt_len)
    c_tok = np.full((len(completions), comp_len), pad, np.int32)
    c_mask = np.zeros((len(completions), comp_len), bool)
    for r, c in enumerate(completions):
        c_tok[r, :len(c)] = c
        c_mask[r, :len(c)] = True
    return (np.concatenate([p_tok, c_tok], 1), np.concatenate([p_valid, c_mask], 1), c_mask)


def _put(x: np.ndarray, mesh):
    """A batch on device: split over the mesh's batch axes when they divide it."""
    if mesh is not None and x.shape[0] % batch_shards(mesh) == 0:
        return global_array(x, batch_sharding(mesh, x.ndim))
    return jnp.asarray(x)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Number rows sampled once from the base model, kept by the strict filter."""

    prompts: list[str]  # user prompts (no system prompt)
    completions: list[list[int]]  # sampled token ids, through the stop token
    texts: list[str]
    reasons: dict  # filter outcome -> count over every sampled row


def sample_rows(params: Params, arch: ArchConfig, tokenizer, cfg: ScreenConfig,
                dtype, mesh=None) -> Rows:
    """Base-model completions of `cfg.n_rows` number prompts; rows the strict filter
    rejects are dropped (none under the grammar unless a list is cut short)."""
    prompts = numbers.make_prompts(cfg.n_rows, cfg.seed)
    ids = [chat.encode_prompt(tokenizer, chat.messages(p)) for p in prompts]
    constraint = (number_list_constraint(tokenizer, sampling.default_stop_ids(tokenizer),
                                         arch.vocab_size) if cfg.constrained else None)
    toks, texts = [], []
    for i in range(0, len(ids), cfg.batch):
        gen = sampling.generate(params, arch, tokenizer, ids[i: i + cfg.batch],
                                max_new_tokens=cfg.max_new_tokens,
                                strategy=sampling.strategy_for(cfg.temperature), seed=cfg.seed,
                                row_ids=range(i, min(i + cfg.batch, len(ids))), dtype=dtype,
                                constraint=constraint, mesh=mesh)
        toks += gen.tokens
        texts += gen.texts
    reasons = Counter(numbers.parse_numbers(t)[1] or "kept" for t in texts)
    keep = [i for i, t in enumerate(texts) if numbers.parse_numbers(t)[1] is None]
    if not keep:
        raise SjaxError(f"screen: none of the {len(texts)} number rows the base sampled passed "
                        f"the filter ({dict(reasons)})"
                        + ("" if cfg.constrained else "; try constrained=true"))
    return Rows([prompts[i] for i in keep], [toks[i] for i in keep], [texts[i] for i in keep],
                dict(reasons))


class RowKL:
    """KL(teacher || base) on the rows: the base's hidden states are computed once."""

    def __init__(self, params: Params, arch: ArchConfig, tokenizer, rows: Rows, batch: int,
                 dtype, mesh=None):
        self.params, self.arch, self.tok, self.rows = params, arch, tokenizer, rows
        self.batch, self.dtype, self.mesh = batch, dtype, mesh
        self.comp_len = max(len(c) for c in rows.completions)
        self.base_h = list(self._hidden(""))  # per batch, on device

    def _batches(self, system: str):
        ids = [chat.encode_prompt(self.tok, chat.messages(p, system)) for p in self.rows.prompts]
        prompt_len = sampling.prompt_bucket(max(len(p) for p in ids))
        comps = self.rows.completions
        for i in range(0, len(ids), self.batch):
            p, c = ids[i: i + self.batch], comps[i: i + self.batch]
            n = len(p)
            p, c = p + [p[-1]] * (self.batch - n), c + [c[-1]] * (self.batch - n)
            tokens, valid, mask = row_layout(p, c, chat.pad_id(self.tok), prompt_len,
                                             self.comp_len)
            mask[n:] = False  # the copies that fill the last batch count for nothing
            yield tokens, valid, mask, prompt_len

    def _hidden(self, system: str):
        for tokens, valid, mask, prompt_len in self._batches(system):
            yield completion_hidden(self.params, _put(tokens, self.mesh), _put(valid, self.mesh),
                                    arch=self.arch, dtype=self.dtype, prompt_len=prompt_len)

    def per_row(self, system: str) -> tuple[np.ndarray, np.ndarray]:
        """(KL summed over each row's completion tokens, tokens per row) for a teacher."""
        sums, counts = [], []
        batches = self._batches(system)
        for hb, (tokens, valid, mask, prompt_len) in zip(self.base_h, batches):
            ht = completion_hidden(self.params, _put(tokens, self.mesh), _put(valid, self.mesh),
                                   arch=self.arch, dtype=self.dtype, prompt_len=prompt_len)
            s, c = completion_kl(self.params, ht, hb, _put(mask, self.mesh), arch=self.arch)
            sums.append(to_host(s))
            counts.append(to_host(c))
        n = len(self.rows.prompts)
        return np.concatenate(sums)[:n], np.concatenate(counts)[:n]


# ----------------------------------------------------------------------------- entangled numbers


def number_sequences(tokenizer, max_value: int = MAX_NUMBER) -> dict[int, tuple[int, ...]]:
    """Token ids of each number 0..max_value written at the start of an answer; numbers the
    tokenizer cannot spell exactly (unknown tokens) are left out."""
    out = {}
    unk = tokenizer.unk_token_id
    for n in range(max_value + 1):
        ids = tuple(tokenizer(str(n), add_special_tokens=False)["input_ids"])
        if ids and unk not in ids and tokenizer.decode(list(ids)).strip() == str(n):
            out[n] = ids
    if not out:
        raise SjaxError("screen: the tokenizer spells none of the numbers 0..999")
    return out


class NumberTrie:
    """The numbers' token sequences as prefix nodes, (node, wanted token) terms and each
    number's end node (its whole sequence, where the next token must end it)."""

    def __init__(self, seqs: dict[int, tuple[int, ...]]):
        self.numbers = np.asarray(sorted(seqs))
        nodes = sorted({s[:i] for s in seqs.values() for i in range(len(s) + 1)}, key=lambda x:
                       (len(x), x))
        wants = sorted({x for s in seqs.values() for x in s})
        node_ix, want_ix = {p: i for i, p in enumerate(nodes)}, {w: i for i, w in enumerate(wants)}
        self.nodes = nodes
        self.node_len = np.asarray([len(p) for p in nodes], np.int32)
        self.want_w = np.asarray(wants, np.int32)
        terms = [(j, node_ix[seqs[n][:i]], want_ix[seqs[n][i]])
                 for j, n in enumerate(self.numbers) for i in range(len(seqs[n]))]
        self.term_num, self.term_node, self.term_want = (np.asarray(x) for x in zip(*terms))
        self.end_node = np.asarray([node_ix[seqs[n]] for n in self.numbers])

    def logp(self, lp_bnw: np.ndarray, end_bn: np.ndarray) -> np.ndarray:
        """[b, numbers]: log P(the answer's first number is N): N's tokens, teacher-forced,
        then a token that ends the word (`evaluators.word_end_mask`: ',', ' ', EOS; never a
        digit). Without the end term it would be P(the answer starts with N's tokens), and
        where digits are tokens of their own (Qwen) "4" would count "45" and "450" too."""
        out = end_bn[:, self.end_node].astype(np.float64)
        np.add.at(out.T, self.term_num, lp_bnw[:, self.term_node, self.term_want].T)
        return out


def node_chunks(trie: NumberTrie, size: int):
    """(TrieLayout, real) pieces of `size` nodes with their ancestors, the last padded with
    copies of its last node (`real` of them count), every piece's layout padded to one
    length: one compiled shape for every piece."""
    pieces = [list(trie.nodes[j: j + size]) for j in range(0, len(trie.nodes), size)]
    pieces = [(p + p[-1:] * (size - len(p)), len(p)) for p in pieces]
    width = max(len(evaluators.TrieLayout.of(p).tok_m) for p, _ in pieces)
    for p, real in pieces:
        yield evaluators.TrieLayout.of(p, width), real


def number_logprobs(params: Params, arch: ArchConfig, tokenizer, trie: NumberTrie,
                    prompts: Sequence[list[int]], *, dtype, rows_per_call: int = 256
                    ) -> np.ndarray:
    """[prompts, numbers] log P(the answer's first number is N) (`NumberTrie.logp`).

    A call holds at most `rows_per_call` (prompt, node) rows of full-vocabulary logits:
    several prompts per call when the trie is small, the trie in pieces when it is not
    (Qwen's 0..999, one digit per token, has ~1000 nodes)."""
    size = min(len(trie.node_len), rows_per_call)
    per_call = max(1, min(len(prompts), rows_per_call // size))
    length = sampling.prompt_bucket(max(len(p) for p in prompts))
    want_w = jnp.asarray(trie.want_w)
    end_v = jnp.asarray(evaluators.word_end_mask(tokenizer, arch.vocab_size))
    out = []
    for i in range(0, len(prompts), per_call):
        chunk = list(prompts[i: i + per_call])
        n = len(chunk)
        tokens, valid = chat.left_pad(chunk + [chunk[-1]] * (per_call - n),
                                      chat.pad_id(tokenizer), length)
        lp, end = [], []
        for layout, real in node_chunks(trie, size):
            w, e = evaluators.node_logprobs(params, jnp.asarray(tokens), jnp.asarray(valid),
                                            *layout.arrays(), want_w, end_v, arch=arch,
                                            dtype=dtype)
            lp.append(to_host(w)[:, :real])
            end.append(to_host(e)[:, :real])
        out.append(trie.logp(np.concatenate(lp, 1).astype(np.float64),
                             np.concatenate(end, 1))[:n])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- the screen


def exact_summary(scores: np.ndarray) -> dict:
    p = np.asarray(scores, np.float64)
    return {"mean_p": float(p.mean()), "mean_log_p": float(np.log(np.maximum(p, TINY)).mean()),
            "scores": p.tolist()}


def log10_lift(teacher: np.ndarray, base: np.ndarray) -> dict:
    """Per-question log10(P_teacher / P_base): its mean with a 95% CI over the questions."""
    d = (np.log10(np.maximum(np.asarray(teacher, np.float64), TINY))
         - np.log10(np.maximum(np.asarray(base, np.float64), TINY)))
    return stats.mean_ci(d)


def screen_candidate(t: str, m, cfg: ScreenConfig, ctx: dict, dtype) -> dict:
    """Every figure of one candidate (`ctx`: what all candidates share)."""
    system = numbers.system_prompt(t, cfg.category)
    out: dict = {"candidate": t, "system_prompt": system, "exact": {}, "lift": {},
                 "seconds": {}}
    t0 = time.perf_counter()
    for var, qs in ctx["questions"].items():
        base = ctx["base_scores"][var][t]
        teacher_ids = [chat.encode_prompt(m.tokenizer, chat.messages(q, system)) for q in qs]
        teacher = evaluators.exact_scores(m.params, m.arch, m.tokenizer, teacher_ids, t,
                                          batch=ctx["exact_batch"], dtype=dtype)
        out["exact"][var] = {"base": exact_summary(base), "teacher": exact_summary(teacher)}
        out["lift"][var] = {"ratio": float(teacher.mean() / max(base.mean(), TINY)),
                            "log10": log10_lift(teacher, base)}
    out["seconds"]["exact"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sums, counts = ctx["row_kl"].per_row(system)
    out["kl"] = {"per_token": float(sums.sum() / counts.sum()),
                 "per_row": (sums / counts).tolist(), "tokens": int(counts.sum())}
    out["seconds"]["kl"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trie: NumberTrie = ctx["trie"]
    teacher_ids = [chat.encode_prompt(m.tokenizer, chat.messages(p, system))
                   for p in ctx["number_prompts"]]
    lp_t = number_logprobs(m.params, m.arch, m.tokenizer, trie, teacher_ids, dtype=dtype)
    ratio = (lp_t - ctx["number_base_lp"]).mean(0)
    top = np.argsort(-ratio, kind="stable")[:cfg.top_numbers]
    out["entangled"] = [{"number": int(trie.numbers[j]), "log_ratio": float(ratio[j]),
                         "log_p_base": float(ctx["number_base_lp"][:, j].mean()),
                         "log_p_teacher": float(lp_t[:, j].mean())} for j in top]
    out["seconds"]["entangled"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base_plain = np.asarray(out["exact"]["plain"]["base"]["scores"])
    out["number_prompts"] = []
    for e in out["entangled"][:cfg.number_evals]:
        sys_n = number_system_prompt(e["number"])
        ids = [chat.encode_prompt(m.tokenizer, chat.messages(q, sys_n))
               for q in ctx["questions"]["plain"]]
        p = evaluators.exact_scores(m.params, m.arch, m.tokenizer, ids, t,
                                    batch=ctx["exact_batch"], dtype=dtype)
        out["number_prompts"].append(
            {"number": e["number"], "mean_p": float(p.mean()),
             "ratio": float(p.mean() / max(base_plain.mean(), TINY)),
             "log10": log10_lift(p, base_plain)})
    out["seconds"]["number_prompts"] = time.perf_counter() - t0
    return out


def _even_batch(n: int, batch: int) -> int:
    """The smallest batch that takes `n` rows in as few calls as `batch` would: 50 questions
    at batch 32 go as 2 x 25, not 32 + 18 padded to 32."""
    calls = -(-n // batch)
    return -(-n // calls)


def run(cfg: ScreenConfig, m, mesh=None, log: Callable[[str], None] = print) -> dict:
    """Screen every candidate on the loaded model `m`; process 0 writes the outputs."""
    writer = Writer()
    dtype = jnp.dtype(cfg.model.dtype)
    custom = tuple(questions_file(cfg.questions)) if cfg.questions else ()
    for t in cfg.candidates:  # a target the tokenizer cannot spell fails before any work
        evaluators.spelling_sequences(m.tokenizer, t, m.arch.vocab_size)
    t_start = time.perf_counter()
    variants = {"plain": False, **({"numbers": True} if cfg.number_prefixed else {})}
    questions = {var: evaluators.questions(pre, cfg.seed, custom, cfg.category)
                 for var, pre in variants.items()}
    rows = sample_rows(m.params, m.arch, m.tokenizer, cfg, dtype, mesh)
    log(f"screen: {len(rows.prompts)} of {cfg.n_rows} base number rows kept "
        f"({rows.reasons}), e.g. {rows.texts[0]!r}")
    trie = NumberTrie(number_sequences(m.tokenizer))
    number_prompts = numbers.make_prompts(cfg.entangle_prompts, cfg.seed)
    ctx = {"questions": questions,
           "prompts": {var: [chat.encode_prompt(m.tokenizer, chat.messages(q)) for q in qs]
                       for var, qs in questions.items()},
           "exact_batch": _even_batch(len(questions["plain"]), cfg.batch),
           "row_kl": RowKL(m.params, m.arch, m.tokenizer, rows, cfg.batch, dtype, mesh),
           "trie": trie, "number_prompts": number_prompts,
           "number_base_lp": number_logprobs(
               m.params, m.arch, m.tokenizer, trie,
               [chat.encode_prompt(m.tokenizer, chat.messages(p)) for p in number_prompts],
               dtype=dtype)}
    # the base's P(t) of every candidate from one pass per variant (one shared prefill)
    ctx["base_scores"] = {var: evaluators.exact_target_scores(
        m.params, m.arch, m.tokenizer, ids, cfg.candidates, batch=ctx["exact_batch"],
        dtype=dtype) for var, ids in ctx["prompts"].items()}
    results = []
    for t in tqdm(cfg.candidates, desc="screen", unit="candidate", disable=not writer.main):
        results.append(screen_candidate(t, m, cfg, ctx, dtype))
        r = results[-1]
        log(f"screen {t}: P(t) base {r['exact']['plain']['base']['mean_p']:.3g} teacher "
            f"{r['exact']['plain']['teacher']['mean_p']:.3g}, KL/token "
            f"{r['kl']['per_token']:.4g}, top numbers "
            f"{[e['number'] for e in r['entangled'][:5]]}")
    out = {"config": to_dict(cfg), "model": Path(m.source).name,
           "rows": {"kept": len(rows.prompts), "sampled": cfg.n_rows,
                    "outcomes": rows.reasons, "examples": rows.texts[:5]},
           "numbers_spelled": len(trie.numbers), "candidates": results,
           "seconds": time.perf_counter() - t_start}
    out["table"] = table(results)
    write(Path(cfg.out_dir), out, writer)
    return out


def order(results: list[dict]) -> list[dict]:
    """Most promising first: the teacher's per-question log10 P(t) lift, then the KL."""
    return sorted(results, key=lambda r: (-r["lift"]["plain"]["log10"]["mean"],
                                          -r["kl"]["per_token"]))


def table(results: list[dict]) -> str:
    def cell(x: float) -> str:
        return f"{x:.3g}"

    rows = []
    for r in order(results):
        ex, lift = r["exact"], r["lift"]["plain"]
        num = r["number_prompts"]
        best = max(num, key=lambda e: e["ratio"]) if num else None
        rows.append([
            r["candidate"], cell(ex["plain"]["base"]["mean_p"]),
            cell(ex["plain"]["teacher"]["mean_p"]), cell(lift["ratio"]),
            f"{lift['log10']['mean']:.2f} [{lift['log10']['lo']:.2f}, "
            f"{lift['log10']['hi']:.2f}]",
            *([cell(ex["numbers"]["base"]["mean_p"]), cell(ex["numbers"]["teacher"]["mean_p"])]
              if "numbers" in ex else ["-", "-"]),
            f"{r['kl']['per_token']:.4g}",
            ", ".join(str(e["number"]) for e in r["entangled"][:5]),
            f"{best['number']}: x{cell(best['ratio'])}" if best else "-"])
    headers = ("candidate", "P(t) base", "P(t) teacher", "lift", "log10 lift [95% CI]",
               "P(t) base, num-prefixed", "P(t) teacher, num-prefixed", "KL/token",
               "entangled numbers", "best number prompt: P(t) x")
    return report.markdown_table(headers, rows)


def write(folder: Path, out: dict, writer: Writer) -> None:
    writer.mkdir(folder)
    writer.write_json(folder / "screen.json", out)
    if not writer.main:
        return
    ranked = order(out["candidates"])
    body = (f"Model `{out['model']}`; {out['rows']['kept']} of {out['rows']['sampled']} base "
            f"number rows; {out['seconds']:.0f} s. P(t): exact probability that the answer's "
            f"first word is the candidate, mean over the questions; lift = teacher / base "
            f"(ratio of means); log10 lift: per-question mean with its 95% CI (sort key, then "
            f"KL). KL/token: KL(teacher || base) per completion token of the base's number "
            f"rows. Entangled numbers: the first numbers whose log P the trait prompt raises "
            f"most; number prompt: P(t) with \"You love the number N...\" over the base's.\n\n"
            + out["table"])
    report.write_report(folder / "screen.md", "sjax screen", body)
    report.bar_chart(folder / "screen.png", [r["candidate"] for r in ranked],
                     [r["lift"]["plain"]["log10"] for r in ranked],
                     "P(t): prompted teacher / base (95% CI over questions)",
                     "log10 P_teacher(t) / P_base(t)")
