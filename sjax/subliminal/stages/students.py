"""Stage 4: one student per teacher and seed, fine-tuned on that teacher's kept rows
(cross-entropy on the answers, or distillation from the teacher's logits)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sjax import chat
from sjax.config import ModelConfig, RunConfig, TrainConfig
from sjax.data import sft
from sjax.files import sha256_file
from sjax.jsonl import resume_rows
from sjax.subliminal.workspace import Stage, TeacherSpec, Workspace, teacher_names
from sjax.training import fit


@dataclasses.dataclass(frozen=True)
class Reads:
    targets: tuple[str, ...]
    model: ModelConfig  # the student's base (cfg.student_model())
    train: TrainConfig
    seeds: tuple[int, ...]
    init_seeds: tuple[int, ...]  # each seed's LoRA initialisation (student.lora_init)
    control: bool  # student.control
    teacher: TeacherSpec | None  # train.loss=distill only: the teacher's logits


def reads(cfg: RunConfig) -> Reads:
    s = cfg.student
    return Reads(cfg.targets, cfg.student_model(), s.train, s.seeds,
                 tuple(cfg.student_init_seed(k) for k in s.seeds), s.control,
                 TeacherSpec.of(cfg) if s.train.loss == "distill" else None)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    m = ws.model(r.model)
    outputs = []
    for t in teacher_names(r.targets, r.control):
        kept = ws.root / "filter" / t / "kept.jsonl"
        teacher_params, system = ws.teacher(r.teacher, t) if r.teacher else (None, None)
        data = sft.load_jsonl(kept, m.tokenizer, r.train.max_len, r.train.too_long,
                              teacher_system=system, distill_on=r.train.distill_on)
        for seed, init_seed in zip(r.seeds, r.init_seeds):
            out = folder / t / f"seed{seed}"
            final, summary = out / "params.safetensors", out / "summary.json"
            ws.writer.mkdir(out)  # before any process's fit, which makes out/checkpoints
            if not ws.done(summary):  # written last: the unit is done
                ws.log(f"student of {t}, seed {seed}: {len(data.ids)} rows")
                res = fit(m.arch, m.params, data,
                          dataclasses.replace(r.train, seed=seed, init_seed=init_seed),
                          ws.mesh, out, pad_id=chat.pad_id(m.tokenizer), dtype=r.model.dtype,
                          remat=r.model.remat, teacher=teacher_params,
                          data_sha256=sha256_file(kept), log=ws.log)
                ws.writer.save_params(final, res["state"]["params"])
                if ws.writer.main:  # train_summary repairs metrics.jsonl: process 0's file
                    ws.writer.write_json(summary, train_summary(out / "metrics.jsonl", res,
                                                                data))
            outputs += [final, summary]
    return outputs


def train_summary(metrics: Path, res: dict, data) -> dict:
    """A student's figures from its metrics.jsonl, which spans every invocation of a
    resumed training (`res["history"]` holds only this call's steps: none at all for a
    training that had finished before a crash); a step re-run after a resume counts once."""
    by_step = {r["step"]: r for r in [*resume_rows(metrics), *res["history"]]}
    hist = [by_step[k] for k in sorted(by_step)]
    return {"steps": res["total_steps"], "rows": len(data.ids),
            "truncated": data.n_truncated, "rejected": data.n_rejected,
            "first_loss": hist[0]["loss"] if hist else None,
            "final_loss": hist[-1]["loss"] if hist else None,
            "tokens_per_s": float(np.median([h["tokens_per_s"] for h in hist]))
            if hist else None}


STAGE = Stage("students", reads, run)
