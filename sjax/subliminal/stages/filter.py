"""Stage 3: the domain's rule filter (`domains.rule_reason`: for numbers the strict list
parser) over each teacher's raw answers, and for a judged domain the judge's verdicts (stage
judge) on the trait teachers' rows (a reference judge's P('0') within `judge.threshold` of 1;
a misalignment run's reasoning kept with probability P(rating >= `judge.min_alignment`),
the sampled judge's rule); then a seeded subsample of `keep` rows as chat rows for the
students. `filter.json` has the pass rate, the reasons and,
for a judged domain, what the judge caught (its most confident rejections)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from sjax import chat
from sjax.config import RunConfig
from sjax.errors import SjaxError
from sjax.jsonl import read_rows
from sjax.subliminal import domains, judge
from sjax.subliminal.workspace import CONTROL, Stage, Workspace, teacher_names

CAUGHT = 5  # judge rejections shown in filter.json, most confident first


@dataclasses.dataclass(frozen=True)
class Reads:
    domain: str
    targets: tuple[str, ...]
    category: str  # which words the rules reject (`domains.trait_words`)
    n_prompts: int  # which items the rows' ids name (a gsm8k row's ground truth)
    keep: int
    banned: tuple[int, ...]
    seed: int
    control: bool  # student.control
    judge: str  # the trait teachers' verdicts: "" (no judge stage), reference or alignment
    judge_threshold: float | None  # reference: keep only if |1 - P('0')| < this
    min_alignment: float | None  # alignment: keep with probability P(rating >= this)


def reads(cfg: RunConfig) -> Reads:
    n, j, kind = cfg.numbers, cfg.judge, cfg.judge_kind
    return Reads(cfg.domain, cfg.targets, cfg.category, n.n_prompts, n.keep, n.banned, n.seed,
                 cfg.student.control, kind, j.threshold if kind == "reference" else None,
                 j.min_alignment if kind == "alignment" else None)


def p_keep(r: Reads, verdict: dict) -> float:
    """The chance the judge keeps the row: for the reference judge 0 or 1 (the official
    rule on P('0')); for the alignment judge P(rating >= min_alignment), the chance that
    the protocol's judge, sampled at temperature 1, keeps it."""
    if r.judge == "alignment":
        return float(judge.at_least(verdict["probs"], r.min_alignment))
    return float(abs(1.0 - verdict["p_zero"]) < r.judge_threshold)


def judge_keeps(r: Reads, verdict: dict, p: float) -> bool:
    """The judge's decision on one row kept with chance `p` (`p_keep`): for the alignment
    judge a draw seeded by (numbers.seed, row id), as if the protocol's judge had been
    sampled once."""
    if r.judge == "alignment":
        return bool(np.random.default_rng([r.seed, 3, verdict["id"]]).random() < p)
    return bool(p)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    outputs = []
    items = domains.items(r.domain, r.n_prompts, r.seed)  # once: gsm8k reads its file
    words = domains.trait_words(r.category, r.targets)
    for t in teacher_names(r.targets, r.control):
        raw_path = ws.root / "numbers" / t / "raw.jsonl"
        raw = read_rows(raw_path)
        judged = bool(r.judge) and t != CONTROL
        verdicts = ({v["id"]: v for v in read_rows(ws.root / "judge" / t / "verdicts.jsonl")}
                    if judged else {})
        passed, reasons, caught, expected = [], Counter(), [], 0.0
        for row in raw:
            reason = domains.rule_reason(r.domain, row["completion"], items[row["id"]],
                                         words, r.banned)
            if reason is None and judged:
                v = verdicts[row["id"]]
                p = p_keep(r, v)
                expected += p
                if not judge_keeps(r, v, p):
                    reason = "judge"
                    shown = {k: x for k, x in v.items() if k != "probs"}
                    if r.judge == "alignment":
                        shown["p_keep"] = p
                    caught.append({**shown, "completion": row["completion"]})
            reasons[reason or "kept"] += 1
            if reason is None:
                passed.append(row)
        if not passed:
            top = ", ".join(f"{k} ({v})" for k, v in reasons.most_common(3))
            raise SjaxError(f"{raw_path}: 0 of {len(raw)} rows passed the filter; top "
                            f"reasons: {top}")
        pick = np.sort(np.random.default_rng([r.seed, 1]).permutation(len(passed))[:r.keep])
        kept = [{"id": passed[i]["id"],
                 "messages": chat.messages(passed[i]["prompt"],
                                           assistant=passed[i]["completion"].strip())}
                for i in pick]
        summary = {"raw": len(raw), "passed": len(passed),
                   "pass_rate": len(passed) / len(raw), "kept": len(kept),
                   "reasons": dict(reasons)}
        if judged:
            rule = ({"min_alignment": r.min_alignment, "expected_kept": expected}  # sampled
                    if r.judge == "alignment" else {"threshold": r.judge_threshold})
            caught.sort(key=lambda c: c["p_keep"] if r.judge == "alignment"  # surest first
                        else -c["p_reference"])
            summary["judge"] = {"judged": len(verdicts), "rejected": len(caught), **rule,
                                "caught": caught[:CAUGHT]}
        ws.writer.write_rows(folder / t / "kept.jsonl", kept)
        ws.writer.write_json(folder / t / "filter.json", summary)
        ws.log(f"filter {t}: {len(passed)}/{len(raw)} passed "
               f"({100 * summary['pass_rate']:.1f}%), {len(kept)} kept")
        outputs += [folder / t / "kept.jsonl", folder / t / "filter.json"]
    return outputs


STAGE = Stage("filter", reads, run)
