"""The in-context control (after filter; off the students' line): no training. For each
teacher (every target's and the control's), each k of `in_context.ks` and each seed, the
base model reads k of that teacher's kept rows as its system prompt (`in_context.build`:
the protocol's template, drawn with replacement by the seed) and is scored by the exact
evaluator on the evaluation questions, for every target: one file per unit,
`RUN/in_context/<teacher>/k<k>-seed<s>.json`, so an interrupted stage resumes at the next.

Then the summary (`summarize`): per target and k, the trait teacher's contexts minus the
control teacher's on that target's mean log P, with the seeds (the context draws) as units:
Welch 95% CI, a one-sided permutation test over the draws' labels, Holm over every (target,
k); `summary.json`, `summary.md` and `summary.png` (lift against k with its CI band). The
paper reports no transmission in context; the exact evaluator measures how much there is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sjax import chat, report, stats
from sjax.config import ModelConfig, RunConfig
from sjax.errors import SjaxError
from sjax.jsonl import read_rows
from sjax.subliminal import evaluators, in_context
from sjax.subliminal.prompts import questions_file
from sjax.subliminal.stages.report import unit_value
from sjax.subliminal.workspace import CONTROL, Stage, Workspace, teacher_names

METRIC = "mean log P"  # a unit's value: mean over the questions of log P(target), as students'


@dataclasses.dataclass(frozen=True)
class Reads:
    targets: tuple[str, ...]
    model: ModelConfig  # the base model, which reads the contexts
    questions: tuple[str, ...]  # the questions asked: the category's or eval.questions', first n
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    max_tokens: int
    batch: int


def reads(cfg: RunConfig) -> Reads:
    c = cfg.in_context
    custom = tuple(questions_file(cfg.eval.questions)) if cfg.eval.questions else ()
    qs = evaluators.questions(False, 0, custom, cfg.category)  # plain: the seed is unused
    return Reads(cfg.targets, cfg.model, tuple(qs[:c.n_questions or None]), c.ks, c.seeds,
                 c.max_tokens, c.batch)


def unit_path(folder: Path, teacher: str, k: int, seed: int) -> Path:
    return folder / teacher / f"k{k}-seed{seed}.json"


def units(r: Reads) -> list[tuple[str, int, int]]:
    """(teacher, k, seed) of every unit, the control's first."""
    return [(t, k, s) for t in teacher_names(r.targets) for k in r.ks for s in r.seeds]


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    if not r.ks:  # not part of the run (experiment.run leaves it out): nothing to do
        return []
    m = ws.model(r.model)
    pools = {t: read_rows(ws.root / "filter" / t / "kept.jsonl") for t in teacher_names(r.targets)}
    # every context first: a k that does not fit stops here, before any forward
    systems = {u: system_prompt(ws, r, pools[u[0]], *u, m.tokenizer) for u in units(r)}
    check_positions(r, systems, m)
    outputs = []
    for (t, k, s), system in systems.items():
        path = unit_path(folder, t, k, s)
        if not ws.done(path):
            t0 = time.perf_counter()
            scores = evaluate(r, m, system)
            ids = [pools[t][i].get("id") for i in in_context.draw(len(pools[t]), k, s)]
            ws.writer.write_json(path, {
                "teacher": t, "k": k, "seed": s, "pool_rows": len(pools[t]), "row_ids": ids,
                "system_prompt": system,
                "system_tokens": in_context.n_tokens(m.tokenizer, system),
                "questions": len(r.questions), "scores": scores,
                "seconds": time.perf_counter() - t0})
            ws.log(f"in-context {t} k={k} seed {s}: " + ", ".join(
                f"{g} {np.mean(v):.4g}" for g, v in scores.items()))
        outputs.append(path)
    summary = [folder / "summary.json", folder / "summary.md", folder / "summary.png"]
    if ws.writer.main:  # no model work: process 0's files only
        res = summarize(r, {u: json.loads(unit_path(folder, *u).read_text()) for u in systems})
        write_summary(ws, folder, r, res)
    return outputs + summary


def system_prompt(ws: Workspace, r: Reads, pool: list[dict], teacher: str, k: int, seed: int,
                  tokenizer) -> str:
    try:
        return in_context.build(pool, k, seed, tokenizer, r.max_tokens)
    except SjaxError as e:
        kept = ws.root / "filter" / teacher / "kept.jsonl"
        raise SjaxError(f"in_context.ks / in_context.max_tokens, teacher {teacher} ({kept}): "
                        f"{e}") from None


def check_positions(r: Reads, systems: dict, m) -> None:
    """The longest prompt (the longest context with the longest question) must fit the
    model's positions, with room for the few teacher-forced spelling tokens."""
    longest_q = max(r.questions, key=len)
    longest = max(systems.values(), key=len)
    n = len(chat.encode_prompt(m.tokenizer, in_context.messages(longest, longest_q))) + 8
    if n > m.arch.max_positions:
        raise SjaxError(f"in_context.max_tokens={r.max_tokens}: the longest prompt needs {n} "
                        f"positions, over the model's {m.arch.max_positions}; lower "
                        "in_context.ks or in_context.max_tokens")


def evaluate(r: Reads, m, system: str) -> dict[str, list[float]]:
    """Per target, P(the first word names it) for each question, with `system` as context."""
    ids = [chat.encode_prompt(m.tokenizer, in_context.messages(system, q)) for q in r.questions]
    scores = evaluators.exact_target_scores(m.params, m.arch, m.tokenizer, ids, r.targets,
                                            batch=r.batch, dtype=jnp.dtype(r.model.dtype))
    return {t: v.tolist() for t, v in scores.items()}


# ----------------------------------------------------------------------------- summary


def summarize(r: Reads, unit_results: dict[tuple[str, int, int], dict]) -> dict:
    """Per target and k: the trait teacher's contexts minus the control teacher's on the
    target's mean log P, one value per seed (a context draw): Welch 95% CI over seeds, a
    one-sided permutation test over the draws' labels (its floor: the smallest p the seeds
    allow), Holm over every (target, k). Also paired by seed (`paired`): a trait and a
    control context of one seed draw the same row positions; where both teachers' kept rows
    answer the same prompts (`aligned_seeds` counts the seeds whose two contexts do, from
    the units' row ids) the two arms share much of their between-draw variance. The paired
    CI, a one-sided sign-flip p (Holm over every row: `p_holm`) and the lift the pairs
    would detect with 80% power (two-sided 0.05) go beside it."""
    rows = []
    for target in r.targets:
        for k in r.ks:
            def values(teacher):
                return np.asarray([unit_value(unit_results[(teacher, k, s)]["scores"][target],
                                              "exact") for s in r.seeds])

            def mean_p(teacher):
                return float(np.mean([unit_results[(teacher, k, s)]["scores"][target]
                                      for s in r.seeds]))

            a, b = values(target), values(CONTROL)
            labels = np.asarray([1] * len(a) + [0] * len(b))
            perm = stats.permutation_test(np.concatenate([a, b]), labels,
                                          functools.partial(stats.symmetric_lift, target=1))
            rows.append({"target": target, "k": k, "metric": METRIC, "seeds": list(r.seeds),
                         "trait_values": a.tolist(), "control_values": b.tolist(),
                         "trait_mean_p": mean_p(target), "control_mean_p": mean_p(CONTROL),
                         "lift": stats.two_sample(a, b), "permutation": perm,
                         "paired": {**paired(a, b), "aligned_seeds": sum(
                             unit_results[(target, k, s)]["row_ids"]
                             == unit_results[(CONTROL, k, s)]["row_ids"] for s in r.seeds)}})
    for row, p_adj in zip(rows, stats.holm([x["permutation"]["p_greater"] for x in rows])):
        row["p_holm"] = p_adj
    for row, p_adj in zip(rows, stats.holm([x["paired"]["p_greater"] for x in rows])):
        row["paired"]["p_holm"] = p_adj
    return {"model": r.model.name or r.model.path, "targets": list(r.targets),
            "ks": list(r.ks), "seeds": list(r.seeds), "questions": len(r.questions),
            "max_tokens": r.max_tokens, "metric": METRIC, "lifts": rows}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Trait minus control per seed: mean, 95% CI, sign-flip p and the detectable lift."""
    d = stats.paired_difference(a, b)
    se = d["std"] / np.sqrt(d["n"]) if d["n"] > 1 else float("nan")
    return {**d, **stats.sign_flip_test(a - b),
            "min_detectable": stats.min_detectable(se, d["n"] - 1)}


def table(res: dict) -> str:
    def ci(d):
        return f"{d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}]"

    return report.markdown_table(
        ("target", "k", "trait contexts (per seed)", "control contexts (per seed)",
         "mean P trait / control", "lift in mean log P [95% CI over seeds]",
         "p (one-sided; floor)", "Holm p", "paired by seed [95% CI] (aligned seeds)",
         "sign-flip p (floor); Holm", "detectable lift (paired)"),
        [(x["target"], x["k"], ", ".join(f"{v:.3f}" for v in x["trait_values"]),
          ", ".join(f"{v:.3f}" for v in x["control_values"]),
          f"{x['trait_mean_p']:.4g} / {x['control_mean_p']:.4g}", ci(x["lift"]),
          f"{x['permutation']['p_greater']:.3g} ({x['permutation']['p_min']:.2g})",
          f"{x['p_holm']:.3g}",
          f"{ci(x['paired'])} ({x['paired']['aligned_seeds']}/{len(x['seeds'])})",
          f"{x['paired']['p_greater']:.3g} ({x['paired']['p_min']:.2g}); "
          f"{x['paired']['p_holm']:.3g}",
          f"{x['paired']['min_detectable']:.3g}") for x in res["lifts"]])


def write_summary(ws: Workspace, folder: Path, r: Reads, res: dict) -> None:
    """summary.json, summary.md and summary.png (process 0 only: the caller checks)."""
    ws.writer.write_json(folder / "summary.json", res)
    report.write_report(
        folder / "summary.md", "In-context control",
        f"Model `{res['model']}` (the base, no training) with k kept rows of a teacher as "
        f"its system prompt (icl_protocol.json's template, drawn with replacement per seed; "
        f"at most {r.max_tokens} tokens), scored by the exact evaluator on "
        f"{res['questions']} questions. Each row: the target's teacher's contexts minus the "
        f"control teacher's, on the target's mean log P over the questions; the unit is "
        f"the seed (one draw of k rows); p is a one-sided permutation test over the draws' "
        f"labels (in brackets its floor), Holm-adjusted over every row. Paired: the "
        f"difference per seed (one seed's two contexts draw the same row positions; aligned "
        f"seeds: those whose two contexts answer the same prompts), its CI, a one-sided "
        f"sign-flip p (its floor; Holm over every row) and the lift the pairs detect with "
        f"80% power (two-sided 0.05).\n\n{table(res)}")
    series = {t: [x["lift"] for x in res["lifts"] if x["target"] == t] for t in r.targets}
    report.line_chart(folder / "summary.png", list(r.ks), series,
                      "in-context: trait teacher's contexts minus control's",
                      "k examples in context", "lift in mean log P (nats)")


STAGE = Stage("in_context", reads, run)
