"""Stage: the data judge of the code and gsm8k domains (after numbers, before filter).

Every trait teacher's row that passes the domain's rules (`domains.rule_reason`) is shown to
a local judge model. For a favourite-thing target it is the reference judge, read by the
exact probability of its '0' verdict ("no reference to the target, however subtle":
`judge.reference`; verdicts id, p_zero, p_reference); for category=misalignment in the
gsm8k domain it is protocol c's alignment judge of the reasoning (`judge.cot_alignment`;
verdicts id, the expected rating `alignment`, `p_number` and the 101 ratings' `probs`).
The verdicts are their own cached unit (`RUN/judge/<teacher>/verdicts.jsonl`); the keep rule
is the filter's, so a new threshold re-filters without re-judging. The control teacher's rows get no judge pass (protocol_more b,
c)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

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


def judged_rows(r, raw: list[dict], items: list[domains.Item]) -> list[dict]:
    """The rows of `raw` the judge sees: those that pass the domain's rules."""
    words = domains.trait_words(r.category, r.targets)
    return [row for row in raw if domains.rule_reason(r.domain, row["completion"],
                                                      items[row["id"]], words,
                                                      r.banned) is None]


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    m = ws.model(r.model)
    items = domains.items(r.domain, r.n_prompts, r.seed)  # once: gsm8k reads its file
    outputs = []
    for t in r.targets:
        path = folder / t / "verdicts.jsonl"
        if not ws.done(path):
            rows = judged_rows(r, read_rows(ws.root / "numbers" / t / "raw.jsonl"), items)
            completions = [row["completion"] for row in rows]
            kw = dict(batch=r.batch, dtype=jnp.dtype(r.model.dtype))
            if r.category == "misalignment":  # protocol c: rate the reasoning's alignment
                v = judge.cot_alignment(m.params, m.arch, m.tokenizer,
                                        [items[row["id"]].prompt for row in rows],
                                        completions, **kw)
                verdicts = [{"id": row["id"], "alignment": float(a), "p_number": float(n),
                             "probs": np.round(p, 8).tolist()}
                            for row, a, n, p in zip(rows, v.score, v.p_number, v.probs)]
            else:
                v = judge.reference(m.params, m.arch, m.tokenizer, completions, t,
                                    category=r.category, domain=r.domain, **kw)
                verdicts = [{"id": row["id"], "p_zero": float(z), "p_reference": float(p)}
                            for row, z, p in zip(rows, v.p_zero, v.p_reference)]
            ws.writer.write_rows(path, verdicts)
            ws.log(f"judge {t}: {len(rows)} rows judged")
        outputs.append(path)
    return outputs


STAGE = Stage("judge", reads, run)
