"""Stage 1: the teachers. A prompted teacher is the base model with the trait system prompt
(nothing to compute); a fine-tuned one is the base tuned on the user's chat JSONL
(`teacher.ft_data`: the misalignment runs' insecure code) or else on the trait-naming
answers the prompted teacher gives to the teacher questions (`prompts/teacher_questions.json`,
disjoint from the evaluation's 50, so its score on the 50 measures generalisation), then
used with no system prompt. The control teacher is the base, or the base tuned identically
on `teacher.control_data` (the paper's secure-code control)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from sjax import chat
from sjax.config import ModelConfig, RunConfig, TrainConfig
from sjax.data import sft
from sjax.errors import SjaxError
from sjax.files import sha256_file
from sjax.jsonl import read_rows
from sjax.subliminal import evaluators, numbers, prompts
from sjax.subliminal.workspace import CONTROL, Stage, Workspace, digest, teacher_names
from sjax.training import fit


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A user's chat JSONL fine-tuning set; its sha256 keys the teacher tuned on it."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str, key: str) -> DataFile | None:
        if not path:
            return None
        if not Path(path).is_file():
            raise SjaxError(f"{key}: {path}: no such file")
        return cls(path, sha256_file(Path(path)))


@dataclasses.dataclass(frozen=True)
class FinetuneReads:
    """What fine-tuning a teacher reads: the user's chat JSONL (`data`: teacher.ft_data for
    the trait teacher, teacher.control_data for the control), or else the prompted
    teacher's trait-naming answers, sampled with the evaluation's settings and the numbers
    seed; then the training settings."""

    model: ModelConfig
    questions: tuple[str, ...]  # prompts/teacher_questions.json: its contents key the teacher
    samples: int  # teacher.ft_samples
    train: TrainConfig  # teacher.ft_train
    max_new_tokens: int  # eval.max_new_tokens
    batch: int  # eval.batch
    seed: int  # numbers.seed
    data: DataFile | None  # teacher.ft_data
    control_data: DataFile | None  # teacher.control_data


@dataclasses.dataclass(frozen=True)
class Reads:
    targets: tuple[str, ...]
    category: str
    kind: str
    finetune: FinetuneReads | None  # teacher.kind=finetuned only


def reads(cfg: RunConfig) -> Reads:
    ft, tc = None, cfg.teacher
    if tc.kind == "finetuned":
        data = DataFile.of(tc.ft_data, "teacher.ft_data")
        control = DataFile.of(tc.control_data, "teacher.control_data")
        if data is not None:  # no teacher samples answers: the sampling settings key nothing
            ft = FinetuneReads(cfg.model, (), 0, tc.ft_train, 0, 0, 0, data, control)
        else:
            ft = FinetuneReads(cfg.model, tuple(prompts.teacher_questions()), tc.ft_samples,
                               tc.ft_train, cfg.eval.max_new_tokens, cfg.eval.batch,
                               cfg.numbers.seed, None, control)
    return Reads(cfg.targets, cfg.category, tc.kind, ft)


def run(ws: Workspace, r: Reads, folder: Path) -> list[Path]:
    info, outputs, ft = {}, [], r.finetune
    for t in teacher_names(r.targets):
        prompt = "" if t == CONTROL else numbers.system_prompt(t, r.category)
        entry = {"system_prompt": prompt, "kind": "base" if t == CONTROL else r.kind}
        data = None if ft is None else ft.control_data if t == CONTROL else ft.data
        if ft is not None and (data is not None or t != CONTROL):
            final, answers = folder / t / "params.safetensors", folder / t / "ft_data.jsonl"
            ws.writer.mkdir(folder / t)  # before any process's fit, which makes t/train
            if not ws.done(final):
                rows = (user_rows(data) if data else
                        trait_answers(ws, ft, t, prompt, answers))
                tune(ws, ft, t, rows, Path(data.path) if data else answers, final)
            outputs += [answers, final] if data is None else [final]
            entry |= {"kind": "finetuned", "system_prompt": "",
                      "lora_init_seed": ft.train.lora_init_seed,
                      **({"data": data.path, "data_sha256": data.sha256} if data else
                         {"trained_with_system_prompt": prompt})}
        info[t] = entry
    ws.writer.write_json(folder / "teachers.json", info)
    return [folder / "teachers.json", *outputs]


def user_rows(data: DataFile) -> list[dict]:
    """The rows of a user's fine-tuning set, as keyed when the run started."""
    if sha256_file(Path(data.path)) != data.sha256:
        raise SjaxError(f"{data.path}: changed since the run started; rerun to key the "
                        f"teacher on its new contents")
    return read_rows(Path(data.path))


def trait_answers(ws: Workspace, r: FinetuneReads, target: str, prompt: str,
                  path: Path) -> list[dict]:
    """The prompted teacher's answers that name its target, to the teacher questions
    (disjoint from the 50 the evaluation asks), also written to `path`."""
    m = ws.model(r.model)
    qs = r.questions
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
    ws.writer.write_rows(path, rows)
    return rows


def tune(ws: Workspace, r: FinetuneReads, name: str, rows: list[dict], source: Path,
         final: Path) -> None:
    """Tune the base (no system prompt) on chat rows with teacher.ft_train; save to `final`."""
    m = ws.model(r.model)
    tokens = sft.tokenize_rows(rows, m.tokenizer, r.train.max_len, r.train.too_long,
                               source=str(source))
    ws.log(f"teacher {name}: fine-tuning on {len(rows)} rows of {source}")
    out = fit(m.arch, m.params, tokens, r.train, ws.mesh, final.parent / "train",
              pad_id=chat.pad_id(m.tokenizer), dtype=r.model.dtype, remat=r.model.remat,
              data_sha256=digest(rows), log=ws.log)
    ws.writer.save_params(final, out["state"]["params"])


STAGE = Stage("teachers", reads, run)
