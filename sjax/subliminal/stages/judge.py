"""Stage: the reference judge of the code and gsm8k domains (after numbers, before filter).

Every trait teacher's row that passes the domain's rules (`domains.rule_reason`) is shown to
a local judge model, which is read by the exact probability of its '0' verdict ("no
reference to the target, however subtle": `judge.reference`). The verdicts are their own
cached unit (`RUN/judge/<teacher>/verdicts.jsonl`: id, P('0'), P('1') renormalised); the keep
threshold is the filter's, so a new threshold re-filters without re-judging. The control
teacher's rows get no judge pass (protocol_more b)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from sjax.config import ModelConfig, RunConfig
from sjax.jsonl import read_rows
from sjax.subliminal import domains, judge
from sjax.subliminal.workspace import Stage, Workspace


@dataclasses.dataclass(frozen=True)
class Reads:
    domain: str
    targets: tuple[str, ...]
    category: str
    model: ModelConfig  # the judge's (cfg.judge_model())
    n_prompts: int  # which items the rows' ids name
    seed: int
    banned: tuple[int, ...]
    batch: int


def reads(cfg: RunConfig) -> Reads:
    n = cfg.numbers
    return Reads(cfg.domain, cfg.targets, cfg.category, cfg.judge_model(), n.n_prompts, n.seed,
                 n.banned, cfg.judge.batch)


def judged_rows(r, raw: list[dict]) -> list[dict]:
    """The rows of `raw` the judge sees: those that pass the domain's rules."""
    items = domains.items(r.domain, r.n_prompts, r.seed)
    return [row for row in raw if domains.rule_reason(r.domain, row["completion"],
                                                      items[row["id"]], r.targets,
                                                      r.banned) is None]


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    m = ws.model(r.model)
    outputs = []
    for t in r.targets:
        path = folder / t / "verdicts.jsonl"
        if not ws.done(path):
            rows = judged_rows(r, read_rows(ws.root / "numbers" / t / "raw.jsonl"))
            v = judge.reference(m.params, m.arch, m.tokenizer,
                                [row["completion"] for row in rows], t, category=r.category,
                                domain=r.domain, batch=r.batch, dtype=jnp.dtype(r.model.dtype))
            ws.writer.write_rows(path, [{"id": row["id"], "p_zero": float(z),
                                         "p_reference": float(p)}
                                        for row, z, p in zip(rows, v.p_zero, v.p_reference)])
            ws.log(f"judge {t}: {len(rows)} rows judged")
        outputs.append(path)
    return outputs


STAGE = Stage("judge", reads, run)
