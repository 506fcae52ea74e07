"""Stage 2: every teacher (the control and one per target) answers the same seeded prompts
of the run's domain (number sequences, code tasks or GSM8K problems: `domains`);
`RUN/numbers/<teacher>/raw.jsonl` holds the user prompt and the completion, never the
system prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from sjax import chat, sampling
from sjax.config import RunConfig
from sjax.constrained import number_list_constraint
from sjax.subliminal import domains
from sjax.subliminal.workspace import Stage, TeacherSpec, Workspace, teacher_names


@dataclasses.dataclass(frozen=True)
class Reads:
    domain: str
    targets: tuple[str, ...]
    teacher: TeacherSpec
    n_prompts: int
    temperature: float
    max_new_tokens: int
    constrained: bool
    batch: int
    seed: int
    control: bool  # student.control: the control teacher's data is needed


def reads(cfg: RunConfig) -> Reads:
    n = cfg.numbers
    return Reads(cfg.domain, cfg.targets, TeacherSpec.of(cfg), n.n_prompts, n.temperature,
                 n.max_new_tokens, n.constrained, n.batch, n.seed, cfg.student.control)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    m = ws.model(r.teacher.model)
    prompts = [it.prompt for it in domains.items(r.domain, r.n_prompts, r.seed)]
    constraint = (number_list_constraint(m.tokenizer, sampling.default_stop_ids(m.tokenizer),
                                         m.arch.vocab_size) if r.constrained else None)
    outputs = []
    for t in teacher_names(r.targets, r.control):
        params, system = ws.teacher(r.teacher, t)
        rows = [{"id": i, "prompt": p,
                 "prompt_ids": chat.encode_prompt(m.tokenizer, chat.messages(p, system))}
                for i, p in enumerate(prompts)]
        path = folder / t / "raw.jsonl"  # user prompt + completion: no system prompt
        sampling.generate_jsonl(path, rows, params, m.arch, m.tokenizer,
                                batch_size=r.batch, max_new_tokens=r.max_new_tokens,
                                strategy=sampling.strategy_for(r.temperature), seed=r.seed,
                                dtype=jnp.dtype(r.teacher.model.dtype), constraint=constraint,
                                mesh=ws.mesh, desc=f"{r.domain} {t}")
        outputs.append(path)
    return outputs


STAGE = Stage("numbers", reads, run)
