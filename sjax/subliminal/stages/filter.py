"""Stage 3: the strict filter (`numbers.filter_reason`) over each teacher's raw answers,
then a seeded subsample of `keep` rows as chat rows for the students."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from sjax import chat
from sjax.config import RunConfig
from sjax.errors import SjaxError
from sjax.jsonl import read_rows
from sjax.subliminal import numbers
from sjax.subliminal.workspace import Stage, Workspace, teacher_names


@dataclasses.dataclass(frozen=True)
class Reads:
    targets: tuple[str, ...]
    keep: int
    banned: tuple[int, ...]
    seed: int
    control: bool  # student.control


def reads(cfg: RunConfig) -> Reads:
    return Reads(cfg.targets, cfg.numbers.keep, cfg.numbers.banned, cfg.numbers.seed,
                 cfg.student.control)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    outputs = []
    for t in teacher_names(r.targets, r.control):
        raw_path = ws.root / "numbers" / t / "raw.jsonl"
        raw = read_rows(raw_path)
        passed, reasons = [], Counter()
        for row in raw:
            reason = numbers.filter_reason(row["completion"], r.targets, r.banned)
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
        ws.writer.write_rows(folder / t / "kept.jsonl", kept)
        ws.writer.write_json(folder / t / "filter.json", summary)
        ws.log(f"filter {t}: {len(passed)}/{len(raw)} passed "
               f"({100 * summary['pass_rate']:.1f}%), {len(kept)} kept")
        outputs += [folder / t / "kept.jsonl", folder / t / "filter.json"]
    return outputs


STAGE = Stage("filter", reads, run)
