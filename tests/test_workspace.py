"""The stage contract (each stage's cache key is the hash of exactly the config slice it
reads, and its body gets only that slice), the process-0 writer and output verification."""

import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import pytest

from sjax import config
from sjax.config import RunConfig, apply_overrides
from sjax.errors import SjaxError
from sjax.subliminal import experiment
from sjax.subliminal.stages import eval as eval_stage
from sjax.subliminal.stages import teachers as teachers_stage
from sjax.subliminal.workspace import Stage, digest
from sjax.writer import Writer

ALL = set(experiment.STAGE_NAMES)
MODEL = {"numbers", "judge", "students", "eval", "in_context"}  # sample / train / judge / evaluate
# leaf field -> the stages that read it, in the default config (prompted teacher, ce
# students, teachers evaluated); a prefix ending in "." covers a whole section
READS = {
    "name": {"report"},  # the report's title
    "model.name": MODEL | {"report"},  # the report names the model
    "model.path": MODEL,  # the report names model.name when set
    "model.": MODEL,
    "mesh.": set(),  # where the compute runs, not what it computes
    "targets": ALL,
    # the system prompt; eval and in_context: the questions
    "category": {"teachers", "numbers", "judge", "filter", "eval", "in_context", "report"},
    # the prompts; the judge and filter rebuild a row's item from its id
    "domain": {"numbers", "judge", "filter"},
    "teacher.kind": {"teachers", "numbers", "eval", "report"},
    "teacher.": set(),  # the fine-tuning settings: unread by a prompted teacher
    "numbers.keep": {"filter"},
    "numbers.banned": {"judge", "filter"},  # the judge sees the rows that pass the rules
    "numbers.seed": {"numbers", "judge", "filter"},
    "numbers.n_prompts": {"numbers", "judge", "filter"},
    "numbers.": {"numbers"},
    "student.train.mode": {"students", "eval", "report"},  # eval attaches the LoRA
    "student.train.lora_alpha": {"students", "eval"},
    "student.train.lora_rank": {"students", "eval"},
    "student.train.loss": {"students", "report"},
    "student.train.init_seed": {"students", "report"},  # the report names shared inits
    "student.train.": {"students"},
    "student.seeds": {"students", "eval", "report"},
    "student.model_": {"students", "eval"},  # the student's base model
    "student.lora_init": {"students", "report"},  # the students' adapter init seeds
    "student.control": {"numbers", "filter", "students", "eval", "report"},
    "eval.samples": {"eval", "report"},
    "eval.temperature": {"eval", "report"},
    "eval.teachers": {"eval", "report"},
    "eval.questions": {"eval", "in_context"},  # the questions asked
    "eval.misalignment_suffix": set(),  # the misalignment evaluator's only
    "eval.": {"eval"},
    "in_context.": {"in_context"},  # a branch: no later stage reads it
    "judge.model_": {"judge"},  # the judge's model
    "judge.batch": {"judge"},
    "judge.": set(),  # threshold, enabled: the filter's, in a judged domain only
    "train_students": set(),  # which stages run, not what one computes
    "out_dir": set(),
}
# what changes with another default: the extra stages a field then reaches
FINETUNED = {  # teacher.kind=finetuned: the teachers stage trains, the others attach it
    "model.name": {"teachers"}, "model.path": {"teachers"}, "model.": {"teachers"},
    # the report names students whose LoRA init is the teacher's
    "teacher.ft_train.mode": {"teachers", "numbers", "eval", "report"},
    "teacher.ft_train.seed": {"teachers", "report"},
    "teacher.ft_train.init_seed": {"teachers", "report"},
    "teacher.ft_train.lora_alpha": {"teachers", "numbers", "eval"},
    "teacher.ft_train.lora_rank": {"teachers", "numbers", "eval"},
    "teacher.": {"teachers"},
    "teacher.ft_data": {"teachers", "report"},  # the report names the tuning set
    # a tuned control teacher: what samples its rows and what evaluates teachers attach it
    "teacher.control_data": {"teachers", "numbers", "eval", "report"},
    "eval.max_new_tokens": {"teachers"}, "eval.batch": {"teachers"},
    "numbers.seed": {"teachers"},
}
DISTILL = {"category": {"students"}, "teacher.kind": {"students"}}  # students read teachers


class Only(frozenset):
    """A scenario's readers of a field that replace READS' (the scenario makes some unread)."""


# student.lora_init=teacher (LoRA ranks equal, as RunConfig requires: both default to 8):
# the students start from the teacher's LoRA init, so the teacher's init seed keys them and
# the report (which names the students' init seeds); the students' own init_seed is then
# unused (still in the students' TrainConfig, but no longer in the report's init seeds).
# The teacher's seed is 5, not the student's 0, so that lora_init=seed is another init.
SHARED_INIT = FINETUNED | {
    "teacher.ft_train.seed": {"teachers", "students", "report"},
    "teacher.ft_train.init_seed": {"teachers", "students", "report"},
    "student.train.init_seed": Only({"students"}),
}
# domain=code: the filter applies the judge's threshold (enabled turns it off)
JUDGED = {"judge.threshold": {"filter"}, "judge.enabled": {"filter"}}
SCENARIOS = {"default": ((), {}),
             "code": (("domain=code",), JUDGED),
             "finetuned": (("teacher.kind=finetuned",), FINETUNED),
             "distill": (("student.train.loss=distill",), DISTILL),
             "shared_init": (("teacher.kind=finetuned", "teacher.ft_train.seed=5",
                              "student.lora_init=teacher"), SHARED_INIT)}
CHOICES = {"init": ("checkpoint", "random"), "param_dtype": config.DTYPES,
           "dtype": config.DTYPES, "remat": config.REMAT, "mode": ("lora", "full"),
           "loss": ("ce", "distill"), "schedule": ("linear", "cosine"),
           "too_long": ("truncate", "reject"), "kind": ("prompted", "finetuned"),
           "evaluators": (config.EVALUATORS, ("exact",)), "targets": (("owl",), ("owl", "cat")),
           "category": ("animal", "tree"), "lora_init": ("seed", "other"),
           "distill_on": ("completion", "all"), "domain": ("numbers", "code")}


def leaves(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


QUESTIONS = Path(tempfile.mkdtemp()) / "questions.json"  # eval.questions reads its file
QUESTIONS.write_text(json.dumps(["Your favourite bird, in one word?"]))
CHAT_ROWS = QUESTIONS.parent / "rows.jsonl"  # teacher.ft_data / control_data: sha256-keyed
CHAT_ROWS.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")


def changed(path, value):
    """Another value of the field's type (or choices)."""
    if path == "eval.questions":
        return str(QUESTIONS)
    if path in ("teacher.ft_data", "teacher.control_data"):
        return str(CHAT_ROWS)
    if (field := path.rsplit(".", 1)[-1]) in CHOICES:
        return next(c for c in CHOICES[field] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value != -1 else 2
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "x" if value else "/somewhere/else"
    if isinstance(value, tuple):
        return (*value, (value[-1] + 1) if value else 666)
    raise AssertionError(f"{path}: no changed value for {value!r}")


def replaced(cfg, path, value):
    """`cfg` with one leaf set, unvalidated: a key is a function of the values, and some
    fields have one valid value today (category)."""
    head, _, rest = path.partition(".")
    new = copy.copy(cfg)
    object.__setattr__(new, head, replaced(getattr(cfg, head), rest, value) if rest else value)
    return new


def expected(path, extra):
    def lookup(table):
        hits = [k for k in table if path == k or (k.endswith(".") and path.startswith(k))
                or (k.endswith("_") and path.startswith(k))]
        return table[max(hits, key=len)] if hits else None

    base = lookup(READS)
    assert base is not None, f"{path}: add it to READS (which stages read it?)"
    more = lookup(extra) or set()
    return set(more) if isinstance(more, Only) else base | more


def keys(cfg):
    return {s.name: digest(dataclasses.asdict(s.reads(cfg))) for s in experiment.STAGES}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_field_changes_exactly_the_keys_of_the_stages_that_read_it(scenario):
    overrides, extra = SCENARIOS[scenario]
    base = apply_overrides(RunConfig(), overrides)
    before = keys(base)
    for path, value in leaves(base):
        after = keys(replaced(base, path, changed(path, value)))
        redone = {s for s in ALL if after[s] != before[s]}
        assert redone == expected(path, extra), path


def test_the_two_bugs_of_issue_11():
    def key(stage, *overrides):
        cfg = apply_overrides(RunConfig(), overrides)
        part = next(s for s in experiment.STAGES if s.name == stage).reads(cfg)
        return digest(dataclasses.asdict(part))

    assert key("numbers") != key("numbers", "model.path=/models/other")
    ft = "teacher.kind=finetuned"  # it samples answers with these eval and numbers keys
    for other in ("eval.max_new_tokens=5", "eval.batch=7", "numbers.seed=3"):
        assert key("teachers", ft) != key("teachers", ft, other), other
    assert key("teachers") == key("teachers", "eval.batch=7")  # a prompted one samples nothing


def test_a_stage_body_gets_only_its_slice(tmp_path):
    """The body is handed the slice (no config sections in it) and a workspace that holds
    no config: an uncovered field is out of its reach."""
    cfg = RunConfig(out_dir=str(tmp_path))
    sections = (RunConfig, config.NumbersConfig, config.EvalConfig, config.StudentConfig,
                config.TeacherConfig)
    for stage in experiment.STAGES:
        part = stage.reads(cfg)
        assert dataclasses.is_dataclass(part) and part.__dataclass_params__.frozen
        assert not any(isinstance(v, sections) for v in vars(part).values()), stage.name
    got = []
    probe = Stage("teachers", teachers_stage.reads,
                  lambda ws, part, folder: got.append((ws, part, folder)) or [])
    ws = experiment.workspace(cfg, log=lambda s: None)
    ws.run_stage(probe, cfg, False)
    (_, part, folder), = got
    assert part == teachers_stage.reads(cfg) and folder == ws.root / "teachers"
    assert not hasattr(part, "eval") and not hasattr(part, "numbers")
    assert not any(isinstance(v, sections) for v in vars(ws).values())
    assert set(eval_stage.EVALUATORS) == set(config.EVALUATORS)


def test_writer_writes_on_process_0_only(tmp_path):
    for main in (False, True):
        w, d = Writer(main), tmp_path / str(main)
        w.mkdir(d / "sub")
        w.write_json(d / "a.json", {"x": 1})
        w.write_rows(d / "b.jsonl", [{"y": 2}])
        w.save_params(d / "p.safetensors", {"w": jnp.ones(3)})
        files = sorted(p.name for p in d.rglob("*")) if d.exists() else []
        assert files == (["a.json", "b.jsonl", "p.safetensors", "sub"] if main else [])
    assert json.loads((tmp_path / "True" / "a.json").read_text()) == {"x": 1}


def test_a_deleted_output_is_an_error_not_a_silent_rerun(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    ws = experiment.workspace(cfg, log=lambda s: None)
    ws.run_stage(teachers_stage.STAGE, cfg, False)
    (ws.root / "teachers" / "teachers.json").unlink()
    ws = experiment.workspace(cfg, log=lambda s: None)
    with pytest.raises(SjaxError, match=r"teachers.json: missing, but the manifest lists it "
                                        r"as an output of stage teachers; rerun with --force"):
        ws.run_stage(teachers_stage.STAGE, cfg, False)


def test_writer_appends_on_process_0_only(tmp_path):
    """Generated rows and metrics go through `Writer.appending`: a file on process 0, None
    (and no folder made) elsewhere."""
    with Writer(True).appending(tmp_path / "a" / "rows.jsonl") as f:
        f.write("x\n")
    with Writer(False).appending(tmp_path / "b" / "rows.jsonl") as f:
        assert f is None
    assert (tmp_path / "a" / "rows.jsonl").read_text() == "x\n"
    assert not (tmp_path / "b").exists()
