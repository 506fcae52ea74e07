"""Stage 1: the teachers. A prompted teacher is the base model with the trait system prompt
(nothing to compute); a fine-tuned one is the base LoRA-tuned on the trait-naming answers
the prompted teacher gives to the teacher questions (`prompts/teacher_questions.json`,
disjoint from the evaluation's 50, so its score on the 50 measures generalisation), then
used with no system prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from sjax import chat
from sjax.config import ModelConfig, RunConfig, TrainConfig
from sjax.data import sft
from sjax.errors import SjaxError
from sjax.subliminal import evaluators, numbers, prompts
from sjax.subliminal.workspace import CONTROL, Stage, Workspace, digest, teacher_names
from sjax.training import fit


@dataclasses.dataclass(frozen=True)
class FinetuneReads:
    """What fine-tuning a teacher reads: it samples the prompted teacher's answers with the
    evaluation's sampling settings and the numbers seed, then trains."""

    model: ModelConfig
    questions: tuple[str, ...]  # prompts/teacher_questions.json: its contents key the teacher
    samples: int  # teacher.ft_samples
    train: TrainConfig  # teacher.ft_train
    max_new_tokens: int  # eval.max_new_tokens
    batch: int  # eval.batch
    seed: int  # numbers.seed


@dataclasses.dataclass(frozen=True)
class Reads:
    targets: tuple[str, ...]
    category: str
    kind: str
    finetune: FinetuneReads | None  # teacher.kind=finetuned only


def reads(cfg: RunConfig) -> Reads:
    ft = None
    if cfg.teacher.kind == "finetuned":
        ft = FinetuneReads(cfg.model, tuple(prompts.teacher_questions()),
                           cfg.teacher.ft_samples, cfg.teacher.ft_train,
                           cfg.eval.max_new_tokens, cfg.eval.batch, cfg.numbers.seed)
    return Reads(cfg.targets, cfg.category, cfg.teacher.kind, ft)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    info, outputs = {}, []
    for t in teacher_names(r.targets):
        prompt = "" if t == CONTROL else numbers.system_prompt(t, r.category)
        entry = {"system_prompt": prompt, "kind": "base" if t == CONTROL else r.kind}
        if t != CONTROL and r.finetune is not None:
            outputs += finetune(ws, r.finetune, t, prompt, folder / t)
            entry |= {"system_prompt": "", "trained_with_system_prompt": prompt,
                      "lora_init_seed": r.finetune.train.lora_init_seed}
        info[t] = entry
    ws.writer.write_json(folder / "teachers.json", info)
    return [folder / "teachers.json", *outputs]


def finetune(ws: Workspace, r: FinetuneReads, target: str, prompt: str,
             folder: Path) -> list[Path]:
    """LoRA-tune the base on the prompted teacher's trait-naming answers (no system)."""
    m = ws.model(r.model)
    final = folder / "params.safetensors"
    ws.writer.mkdir(folder)  # before any process's fit, which makes folder/train
    if not ws.done(final):
        qs = r.questions  # disjoint from the 50 the evaluation asks
        chat_prompts = [chat.encode_prompt(m.tokenizer, chat.messages(q, prompt)) for q in qs]
        answers = evaluators.sampled_answers(
            m.params, m.arch, m.tokenizer, chat_prompts, samples=r.samples,
            max_new_tokens=r.max_new_tokens, batch=r.batch, seed=r.seed + 1,
            dtype=jnp.dtype(r.model.dtype), mesh=ws.mesh)
        rows = [{"messages": chat.messages(q, assistant=a.strip())}
                for q, qa in zip(qs, answers) for a in qa if evaluators.is_hit(a, target)]
        if not rows:
            raise SjaxError(f"teacher {target}: the prompted teacher named it in none of "
                            f"{len(qs) * r.samples} answers; no data to fine-tune on")
        ws.writer.write_rows(folder / "ft_data.jsonl", rows)
        data = sft.tokenize_rows(rows, m.tokenizer, r.train.max_len,
                                 source=str(folder / "ft_data.jsonl"))
        ws.log(f"teacher {target}: fine-tuning on {len(rows)} trait answers")
        out = fit(m.arch, m.params, data, r.train, ws.mesh, folder / "train",
                  pad_id=chat.pad_id(m.tokenizer), dtype=r.model.dtype, remat=r.model.remat,
                  data_sha256=digest(rows), log=ws.log)
        ws.writer.save_params(final, out["state"]["params"])
    return [folder / "ft_data.jsonl", final]


STAGE = Stage("teachers", reads, run)
