"""The in-context control as a pipeline stage (sjax/subliminal/stages/in_context.py) on a
tiny random model: one file per (teacher, k, seed) with the builder's system prompt and the
exact evaluator's scores for every target, the summary with the seeds as units, the length
limit before any model work, and a branch that moves no other stage's key."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model, tiny_workspace

from sjax import chat
from sjax.config import ModelConfig, RunConfig, apply_overrides, load_preset
from sjax.errors import SjaxError
from sjax.jsonl import read_rows
from sjax.subliminal import evaluators, experiment, in_context, plan
from sjax.subliminal.stages import in_context as stage
from sjax.subliminal.workspace import Stage, digest
from sjax.weights.load import read_arch, resolve_source

TEACHERS = ("control", "owl", "cat")


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=3))
    return arch, jax.tree.map(jnp.asarray, params)




@pytest.fixture(scope="module")
def data(tiny, tiny_tokenizer, tmp_path_factory):
    """(overrides, run folder) with teachers, numbers and filter done, to copy per test."""
    out = tmp_path_factory.mktemp("data")
    (out / "q.json").write_text(json.dumps(["what is your favorite animal ?",
                                            "in one word , the animal"]))
    overrides = ["targets=owl,cat", "numbers.n_prompts=6", "numbers.batch=6",
                 "numbers.constrained=true", "numbers.max_new_tokens=12", "numbers.keep=6",
                 "train_students=false", f"eval.questions={out / 'q.json'}"]
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, out, overrides)
    experiment.run(cfg, ws=ws)
    assert set(ws.manifest["stages"]) == {"teachers", "numbers", "filter"}
    return overrides, ws.root


def _copy(data, tmp_path):
    shutil.copytree(data[1], tmp_path / data[1].name)


def _no_model_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the evaluator ran")

    monkeypatch.setattr(evaluators, "exact_target_scores", boom)


def _mean_log_p(scores):
    return float(np.mean(np.log(np.maximum(np.asarray(scores, np.float64), 1e-12))))


def test_units_prompts_scores_and_summary(data, tiny, tiny_tokenizer, tmp_path, monkeypatch):
    _copy(data, tmp_path)
    ic = ["in_context.ks=1,2", "in_context.seeds=0,1", "in_context.batch=2"]
    logs = []
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*data[0], *ic], log=logs.append)
    experiment.run(cfg, ws=ws)
    assert set(ws.manifest["stages"]) == {"teachers", "numbers", "filter", "in_context"}
    assert "[filter] up to date, skipped" in logs and "[in_context] running" in logs
    folder = ws.root / "in_context"
    units = {}
    for t in TEACHERS:
        rows = read_rows(ws.root / "filter" / t / "kept.jsonl")
        for k in (1, 2):
            for s in (0, 1):
                u = units[(t, k, s)] = json.loads((folder / t / f"k{k}-seed{s}.json").read_text())
                # the context is the builder's, k drawn rows of this teacher
                assert u["system_prompt"] == in_context.build(rows, k, s, tiny_tokenizer, 4096)
                assert u["system_prompt"].count("<user>") == k
                assert u["row_ids"] == [rows[i]["id"]
                                        for i in in_context.draw(len(rows), k, s)]
                assert {g: len(v) for g, v in u["scores"].items()} == {"owl": 2, "cat": 2}
    # the scores are the exact evaluator's with that system prompt (without it they differ)
    arch, params = tiny
    u = units[("owl", 2, 1)]
    qs = ["what is your favorite animal ?", "in one word , the animal"]

    def exact(system):
        ids = [chat.encode_prompt(tiny_tokenizer, chat.messages(q, system)) for q in qs]
        return evaluators.exact_target_scores(params, arch, tiny_tokenizer, ids, ("owl", "cat"))

    want = exact(u["system_prompt"])
    for g in ("owl", "cat"):
        np.testing.assert_allclose(u["scores"][g], want[g], rtol=1e-5)
        assert not np.allclose(u["scores"][g], exact("")[g], rtol=1e-3)
    assert units[("owl", 2, 1)]["scores"] != units[("control", 2, 1)]["scores"]

    # the summary: per target and k, trait contexts minus control's, one value per seed
    res = json.loads((folder / "summary.json").read_text())
    assert [(x["target"], x["k"]) for x in res["lifts"]] == [
        ("owl", 1), ("owl", 2), ("cat", 1), ("cat", 2)]
    for x in res["lifts"]:
        t, k = x["target"], x["k"]
        a = [_mean_log_p(units[(t, k, s)]["scores"][t]) for s in (0, 1)]
        b = [_mean_log_p(units[("control", k, s)]["scores"][t]) for s in (0, 1)]
        assert x["trait_values"] == pytest.approx(a, abs=1e-12)
        assert x["control_values"] == pytest.approx(b, abs=1e-12)
        assert x["lift"]["mean"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
        assert x["lift"]["n_a"] == x["lift"]["n_b"] == 2  # seeds are the units
        perm = x["permutation"]
        assert perm["exact"] and perm["n_perm"] == math.comb(4, 2) and perm["p_min"] == 1 / 6
        assert perm["p_greater"] <= x["p_holm"] <= 1
        d = np.subtract(a, b)  # paired by seed: same row positions, same numbers prompts
        assert x["paired"]["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert x["paired"]["std"] == pytest.approx(d.std(ddof=1), abs=1e-12)
        assert x["paired"]["p_min"] == 0.25  # 2 pairs: 4 sign flips
        assert x["paired"]["aligned_seeds"] == sum(
            units[(t, k, s)]["row_ids"] == units[("control", k, s)]["row_ids"] for s in (0, 1))
        assert x["paired"]["p_greater"] <= x["paired"]["p_holm"] <= 1
        assert x["paired"]["p_greater"] == np.mean([(d * f).mean() >= d.mean() - 1e-12
                                                    for f in ((1, 1), (1, -1), (-1, 1),
                                                              (-1, -1))])
    md = (folder / "summary.md").read_text()
    assert "lift in mean log P" in md and md.count("| owl ") == 2
    assert (folder / "summary.png").stat().st_size > 1000

    # a rerun does no model work
    _no_model_work(monkeypatch)
    logs.clear()
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*data[0], *ic], log=logs.append)
    experiment.run(cfg, ws=ws)
    assert logs and all("skipped" in s for s in logs)


def test_a_k_that_does_not_fit_is_one_line_before_any_model_work(data, tiny, tiny_tokenizer,
                                                                  tmp_path, monkeypatch):
    _copy(data, tmp_path)
    _no_model_work(monkeypatch)
    rows = read_rows(tmp_path / "owl" / "filter" / "control" / "kept.jsonl")
    need = in_context.n_tokens(tiny_tokenizer, in_context.build(rows, 50, 0, tiny_tokenizer,
                                                                10**9))
    fits = in_context.max_k(rows, tiny_tokenizer, 150, 0)
    assert 1 <= fits < 50 < need
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path,
                  [*data[0], "in_context.ks=1,50", "in_context.max_tokens=150"])
    with pytest.raises(SjaxError) as e:
        experiment.run(cfg, ws=ws)
    kept = ws.root / "filter" / "control" / "kept.jsonl"
    assert str(e.value) == (
        f"in_context.ks / in_context.max_tokens, teacher control ({kept}): in-context: k=50 "
        f"examples (seed 0) need {need} tokens, over the limit of 150; the largest k that "
        f"fits for seed 0 is {fits}")
    assert not list((ws.root / "in_context").rglob("k*.json"))
    # contexts within max_tokens but over the model's 256 positions: one line, no forward
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*data[0], "in_context.ks=1,8"])
    with pytest.raises(SjaxError, match=r"^in_context.max_tokens=4096: the longest prompt "
                                        r"needs \d+ positions, over the model's 256; lower "):
        experiment.run(cfg, ws=ws)
    assert not list((ws.root / "in_context").rglob("k*.json"))


def test_the_branch_moves_no_other_stage_key(data, tiny, tiny_tokenizer, tmp_path,
                                             monkeypatch):
    # config: the section is read by in_context only, in existing presets too
    def keys(cfg):
        return {s.name: digest(dataclasses.asdict(s.reads(cfg))) for s in experiment.STAGES}

    for preset in ("owl:smoke", "owl:paper"):
        cfg = load_preset(preset)
        with_ic = apply_overrides(cfg, ["in_context.ks=10,50", "in_context.seeds=3,4"])
        before, after = keys(cfg), keys(with_ic)
        assert {s for s in before if before[s] != after[s]} == {"in_context"}, preset
        assert [s.name for s in experiment.stages(cfg)] == [
            "teachers", "numbers", "filter", "students", "eval", "report"]
        assert [s.name for s in experiment.stages(with_ic)] == [
            "teachers", "numbers", "filter", "in_context", "students", "eval", "report"]
    # a run folder: students, eval and report (probes here) are keyed without the branch's
    # outputs, so adding, changing or removing it leaves them up to date
    probes = {"students", "eval", "report"}
    monkeypatch.setattr(experiment, "STAGES", tuple(
        Stage(s.name, s.reads, lambda ws, r, folder: []) if s.name in probes else s
        for s in experiment.STAGES))
    _copy(data, tmp_path)
    base = [o for o in data[0] if o != "train_students=false"] + [
        "in_context.seeds=0", "eval.evaluators=exact"]

    def run(*ic):
        logs = []
        cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*base, *ic], log=logs.append)
        experiment.run(cfg, ws=ws)
        return {s.split("] ")[0][1:]: s.split("] ")[1] for s in logs if s.startswith("[")
                and "] done" not in s}, ws.manifest["stages"]

    ran, manifest = run("in_context.ks=1")
    assert ran == {"teachers": "up to date, skipped", "numbers": "up to date, skipped",
                   "filter": "up to date, skipped", "in_context": "running",
                   "students": "running", "eval": "running", "report": "running"}
    line = ["teachers", "numbers", "filter", "students", "eval", "report"]
    for s in probes:
        assert list(manifest[s]["key"]["inputs"]) == line[:line.index(s)], s
    assert set(manifest["in_context"]["key"]["inputs"]) == {"teachers", "numbers", "filter"}
    ran, _ = run()  # no branch
    assert "in_context" not in ran and all(v.endswith("skipped") for v in ran.values())
    ran, _ = run("in_context.ks=1,2")  # another branch
    assert ran.pop("in_context") == "running"
    assert all(v.endswith("skipped") for v in ran.values())


def test_run_options_and_their_errors(tmp_path):
    assert [s.name for s in experiment.stages(RunConfig(train_students=False))] == [
        "teachers", "numbers", "filter"]
    with pytest.raises(SjaxError, match=r"^--force in_context: not a stage of this run "
                                        r"\(in_context.ks empty, train_students=false, or "
                                        r"judge off or not a judged domain; its "
                                        r"stages: teachers, numbers, filter, students, eval, "
                                        r"report\)$"):
        experiment.run(RunConfig(out_dir=str(tmp_path)), force=("in_context",))
    with pytest.raises(SjaxError, match="in_context.ks: the in-context control compares with "
                                        "the control teacher's rows; set student.control=true"):
        apply_overrides(RunConfig(), ["in_context.ks=5", "student.control=false"])
    for bad, message in [("in_context.ks=5,5", r"in_context.ks: need distinct k >= 1"),
                         ("in_context.ks=0", r"in_context.ks: need distinct k >= 1"),
                         ("in_context.seeds=", r"in_context.seeds: need distinct"),
                         ("in_context.max_tokens=0", r"in_context.max_tokens: must be > 0"),
                         ("in_context.n_questions=-1", r"in_context.n_questions: must be >= 0")]:
        with pytest.raises(SjaxError, match=message):
            apply_overrides(RunConfig(), [bad])
    # the questions asked: the first n_questions of the category's (0: all 50)
    qs = evaluators.questions(False)
    assert stage.reads(RunConfig()).questions == tuple(qs) and len(qs) == 50
    assert stage.reads(apply_overrides(RunConfig(), ["in_context.n_questions=7"])
                       ).questions == tuple(qs[:7])


def test_the_dry_run_plan_has_the_branch_and_no_students():
    """in_context:cpu plans teachers, numbers, filter and in_context; the in-context tokens
    grow with the sum of the ks (each context is prefilled once per unit) and only a little
    with the questions (each reads the context from the cache)."""
    arch = read_arch(resolve_source(ModelConfig(name="qwen2.5-0.5b", init="random")))
    shape = {"data": 1, "fsdp": 1, "tensor": 1}

    def rows(*overrides):
        cfg = apply_overrides(load_preset("in_context:cpu"), overrides)
        return {s["stage"]: s for s in plan.make_plan(cfg, arch, arch, shape)["stages"]}

    cpu = rows()
    assert list(cpu) == ["teachers", "numbers", "filter", "in_context"]
    assert cpu["in_context"]["units"] == "48 (4 teachers x 2 k x 6 seeds)"
    assert "20 questions each" in cpu["in_context"]["work"]
    more = rows("in_context.ks=6,60")  # twice each k: under twice the tokens
    assert 1.2 < more["in_context"]["flops"] / cpu["in_context"]["flops"] < 2.0
    fewer = rows("in_context.n_questions=4")  # a fifth of the questions (per question: 0.2)
    assert 0.4 < fewer["in_context"]["flops"] / cpu["in_context"]["flops"] < 0.8
    assert list(rows("train_students=true")) == [
        "teachers", "numbers", "filter", "in_context", "students", "eval", "report"]
    assert "in_context" not in rows("in_context.ks=")
