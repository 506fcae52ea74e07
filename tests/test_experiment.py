"""The experiment: the filter stage, cached reruns and stage keys on a tiny model, the
fine-tuned teacher, resumed students, and the smoke run end to end."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, run_preset, tiny_hf_model, tiny_workspace

from sjax import chat, cli
from sjax.config import RunConfig, apply_overrides, load_preset
from sjax.errors import SjaxError
from sjax.jsonl import write_rows
from sjax.models.transformer import forward
from sjax.subliminal import evaluators, experiment, numbers, prompts, workspace
from sjax.subliminal.stages import filter as filter_stage
from sjax.subliminal.stages import students as students_stage
from sjax.subliminal.stages import teachers as teachers_stage
from sjax.subliminal.workspace import teacher_names


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=3))
    return arch, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------- filter stage


def test_zero_kept_rows_is_a_clear_error(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    ws = experiment.workspace(cfg, log=lambda s: None)
    for t in teacher_names(cfg.targets):
        write_rows(ws.root / "numbers" / t / "raw.jsonl",
                   [{"id": i, "prompt": "p", "completion": c}
                    for i, c in enumerate(["I love owls", "1 - 2", "1 - 3"])])
    with pytest.raises(SjaxError, match=r"0 of 3 rows passed the filter; top reasons: "
                                        r"bad_separator \(2\), trait_word \(1\)"):
        filter_stage.run(ws, filter_stage.reads(cfg), ws.root / "filter")


def test_bad_configs(tmp_path, capsys):
    with pytest.raises(SjaxError, match="unknown target category 'plant'"):
        RunConfig(category="plant")
    with pytest.raises(SjaxError, match="lower-case word"):
        RunConfig(targets=("Owl",))
    with pytest.raises(SjaxError, match="cross-model"):
        apply_overrides(RunConfig(), ["student.model_name=smollm2-135m-instruct",
                                      "student.train.loss=distill"])
    assert cli.main(["run", "owl:smoke", "category=plant", "--dry-run"]) == 2
    assert "unknown target category" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~4.5 min: `./launch.sh test -m slow -k smoke`
def test_smoke_pipeline_end_to_end_then_cached_then_corruption(tmp_path):
    proc = run_preset("owl:smoke", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "owl_smoke"
    manifest = json.loads((root / "manifest.json").read_text())
    cfg = apply_overrides(load_preset("owl:smoke"), [f"out_dir={tmp_path}"])
    assert set(manifest["stages"]) == {s.name for s in experiment.stages(cfg)}
    assert "in_context" not in manifest["stages"]  # no in_context.ks: not part of the run
    for t in ("control", "owl"):
        raw = [json.loads(x) for x in (root / "numbers" / t / "raw.jsonl").read_text().splitlines()]
        assert len(raw) == 32 and set(raw[0]) == {"id", "prompt", "completion", "n_tokens"}
        assert numbers.system_prompt("owl", "animal") not in json.dumps(raw)
        kept = [json.loads(x) for x in (root / "filter" / t / "kept.jsonl").read_text().splitlines()]
        assert kept and [m["role"] for m in kept[0]["messages"]] == ["user", "assistant"]
        f = json.loads((root / "filter" / t / "filter.json").read_text())
        assert f["kept"] == len(kept) and sum(f["reasons"].values()) == 32
        assert (root / "students" / t / "seed0" / "params.safetensors").is_file()
    for name in ("base", "student-control-seed0", "student-owl-seed0", "teacher-owl"):
        ev = json.loads((root / "eval" / f"{name}.json").read_text())
        for var in ("plain",):
            scores = ev["variants"][var]["owl"]
            assert len(scores["exact"]) == len(scores["sampled"]) == 50
            assert all(0 <= x <= 1 for x in scores["exact"])
    res = json.loads((root / "report" / "results.json").read_text())
    assert {r["condition"] for r in res["rows"]} == {"base", "control students",
                                                     "owl students", "owl teacher"}
    assert (root / "report" / "results.png").stat().st_size > 1000
    assert "owl student" in (root / "report" / "report.md").read_text()
    assert "owl student" in proc.stdout  # the CLI prints the table
    # the prompted teacher must rank owl far above the base model (exact evaluator)
    by = {(r["condition"], r["variant"], r["evaluator"]): r["mean"] for r in res["rows"]}
    assert by[("owl teacher", "plain", "exact")] > 5 * by[("base", "plain", "exact")]

    # a rerun of a finished run does no model work
    logs = []
    ws = experiment.run(cfg, ws=experiment.workspace(cfg, log=logs.append))
    assert ws.model_loads == 0 and all("skipped" in s for s in logs)

    # a corrupted kept.jsonl is caught by its hash
    kept_file = root / "filter" / "owl" / "kept.jsonl"
    kept_file.write_text(kept_file.read_text().replace("1", "7"))
    with pytest.raises(SjaxError, match=r"kept.jsonl: contents differ from the manifest"):
        experiment.run(cfg, ws=experiment.workspace(cfg, log=lambda s: None))
    assert cli.main(["run", "owl:smoke", f"out_dir={tmp_path}"]) == 2




def _run_until(ws, cfg, last: str) -> None:
    """The experiment's stages up to and including `last`, as `experiment.run` takes them."""
    names = [s.name for s in experiment.stages(cfg)]
    for stage in experiment.stages(cfg)[:names.index(last) + 1]:
        ws.run_stage(stage, cfg, False)


def test_changing_the_model_redoes_the_numbers(tiny, tiny_tokenizer, tmp_path):
    """Issue 11: another model's numbers were reused, as the numbers key lacked the model."""
    small = ["numbers.n_prompts=4", "numbers.batch=4", "numbers.max_new_tokens=6"]
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, small)
    _run_until(ws, cfg, "numbers")
    raw = (ws.root / "numbers" / "owl" / "raw.jsonl").read_bytes()
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=4))
    other = (arch, jax.tree.map(jnp.asarray, params))
    logs = []
    cfg2, ws2 = tiny_workspace(other, tiny_tokenizer, tmp_path,
                         [*small, "model.path=/models/another"], log=logs.append)
    _run_until(ws2, cfg2, "numbers")
    # a prompted teacher is the model plus a prompt: teachers.json does not name the model
    assert logs[0] == "[teachers] up to date, skipped" and logs[1] == "[numbers] running"
    assert (ws.root / "numbers" / "owl" / "raw.jsonl").read_bytes() != raw
    logs.clear()  # a field the numbers stage does not read (the filter's keep) keeps it
    cfg3, ws3 = tiny_workspace(other, tiny_tokenizer, tmp_path,
                         [*small, "model.path=/models/another", "numbers.keep=3"],
                         log=logs.append)
    _run_until(ws3, cfg3, "numbers")
    assert logs == ["[teachers] up to date, skipped", "[numbers] up to date, skipped"]


def test_finetuned_teacher_is_trained_on_its_trait_answers(tiny, tiny_tokenizer, tmp_path):
    """teacher.kind=finetuned: sample from the prompted teacher's answers to the teacher
    questions (disjoint from the evaluation's 50), keep trait answers, LoRA-tune the base on
    them without the system prompt; the run then uses the base with those adapters. Its
    sampling settings (eval.max_new_tokens) are in its key: changing them redoes it."""
    arch, params = tiny
    ft = ["teacher.kind=finetuned", "teacher.ft_samples=8", "teacher.ft_train.epochs=1",
          "teacher.ft_train.batch_size=4", "eval.max_new_tokens=6", "eval.batch=64"]
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, ft)
    _run_until(ws, cfg, "teachers")
    rows = [json.loads(x) for x in (ws.root / "teachers" / "owl" / "ft_data.jsonl")
            .read_text().splitlines()]
    assert rows and all(evaluators.is_hit(r["messages"][-1]["content"], "owl") for r in rows)
    asked = {r["messages"][0]["content"] for r in rows}
    assert asked <= set(prompts.teacher_questions())
    assert not asked & set(evaluators.questions(False))
    assert all(m["role"] != "system" for r in rows for m in r["messages"])
    info = json.loads((ws.root / "teachers" / "teachers.json").read_text())
    assert info["owl"]["system_prompt"] == "" and info["owl"]["kind"] == "finetuned"
    assert "teachers/owl/params.safetensors" in ws.manifest["stages"]["teachers"]["outputs"]
    teacher, system = ws.teacher(workspace.TeacherSpec.of(cfg), "owl")
    assert system == ""
    assert set(teacher) == set(params) | {"lora"}  # the base, adapters attached
    ids = jnp.asarray([[1, 5, 9, 12, 3]])
    diff = float(jnp.abs(forward(teacher, ids, arch=arch)[0]
                         - forward(params, ids, arch=arch)[0]).max())
    assert diff > 1e-4
    for change, redone in (("eval.samples=3", False), ("eval.max_new_tokens=5", True)):
        logs = []
        cfg2, ws2 = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*ft, change], log=logs.append)
        _run_until(ws2, cfg2, "teachers")
        assert logs[0] == ("[teachers] running" if redone else "[teachers] up to date, skipped")


def test_a_resumed_finished_student_keeps_its_figures(tiny, tiny_tokenizer, tmp_path):
    """A crash after a student's last checkpoint but before its params and summary: the
    rerun trains 0 steps, and the summary still holds the training's recorded losses."""
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [
        "student.train.mode=full", "student.train.batch_size=4", "student.train.grad_accum=1",
        "student.train.epochs=1", "student.train.ckpt_every=1", "student.train.warmup_steps=0"])
    rows = [{"id": i, "messages": chat.messages("numbers", assistant=f"{i} , {i + 1} , 7")}
            for i in range(8)]
    for t in teacher_names(cfg.targets):
        write_rows(ws.root / "filter" / t / "kept.jsonl", rows)
    folder = ws.root / "students"
    students_stage.run(ws, students_stage.reads(cfg), folder)
    unit = folder / "control" / "seed0"
    first = json.loads((unit / "summary.json").read_text())
    assert first["steps"] == 2 and first["first_loss"] > first["final_loss"] > 0
    (unit / "summary.json").unlink()
    (unit / "params.safetensors").unlink()
    students_stage.run(ws, students_stage.reads(cfg), folder)
    assert json.loads((unit / "summary.json").read_text()) == first
    assert (unit / "params.safetensors").is_file()


def test_a_stage_folder_that_cannot_be_cleared_stops_the_run(tmp_path, monkeypatch):
    cfg = RunConfig(out_dir=str(tmp_path))
    ws = experiment.workspace(cfg, log=lambda s: None)
    ws.run_stage(teachers_stage.STAGE, cfg, False)
    real = workspace.shutil.rmtree

    def rmtree(path, ignore_errors=False, **kw):  # as the OS answers for a folder we may not
        if not ignore_errors:                     # empty; errors ignored: nothing is removed
            raise PermissionError(13, "Permission denied", str(Path(path) / "teachers.json"))

    monkeypatch.setattr(workspace.shutil, "rmtree", rmtree)
    with pytest.raises(SjaxError, match=rf"^{ws.root / 'teachers'}: cannot clear stage "
                                        r"teachers's old work \(Permission denied\)"):
        ws.run_stage(teachers_stage.STAGE, cfg, True)
    monkeypatch.setattr(workspace.shutil, "rmtree", real)
    ws.run_stage(teachers_stage.STAGE, cfg, True)  # clearable: the forced stage is redone
    assert json.loads((ws.root / "teachers" / "teachers.json").read_text())["owl"]


def test_eval_asks_the_questions_of_eval_questions(tiny, tiny_tokenizer, tmp_path):
    """eval.questions=FILE with 2 questions: every condition's exact and sampled scores are
    one per question of the file, plain and number-prefixed (not the category's 50)."""
    (tmp_path / "q.json").write_text(json.dumps(["what is your favorite animal ?",
                                                 "in one word , the animal"]))
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [
        f"eval.questions={tmp_path / 'q.json'}", "eval.samples=2", "eval.max_new_tokens=3",
        "eval.batch=8", "numbers.n_prompts=8", "numbers.batch=8", "numbers.constrained=true",
        "numbers.max_new_tokens=8", "student.control=false", "student.train.batch_size=2",
        "student.train.grad_accum=1", "student.train.epochs=1"])
    _run_until(ws, cfg, "eval")
    files = sorted((ws.root / "eval").glob("[!.]*.json"))  # not .stage_key.json
    assert [f.stem for f in files] == ["base", "student-owl-seed0", "teacher-owl"]
    for f in files:
        variants = json.loads(f.read_text())["variants"]
        assert set(variants) == {"plain", "numbers"}
        for var in variants.values():
            assert {ev: len(v) for ev, v in var["owl"].items()} == {"exact": 2, "sampled": 2}


@pytest.mark.slow  # ~35 s alone: the design the README's transmission result rests on
def test_the_transmission_design_runs_and_reports_runs_as_units(tiny, tiny_tokenizer,
                                                                  tmp_path):
    """configs/transmission.py's design on the tiny model: fine-tuned LoRA teachers for two
    targets, students distilled at every position from the teacher's own LoRA init, no
    control students; the report's lift per target (students of the target minus the other
    target's, one value per seed), permutation p, power, Holm, and the pooled test."""
    design = ["targets=owl,cat", "teacher.kind=finetuned", "teacher.ft_samples=2",
              "teacher.ft_train.epochs=1", "teacher.ft_train.batch_size=1",
              "teacher.ft_train.lora_rank=4", "eval.max_new_tokens=4", "eval.batch=64",
              "numbers.n_prompts=8", "numbers.keep=8", "numbers.constrained=true",
              "numbers.max_new_tokens=12", "student.train.loss=distill",
              "student.train.distill_on=all", "student.train.lora_rank=4",
              "student.train.batch_size=4", "student.train.grad_accum=1",
              "student.train.epochs=1", "student.lora_init=teacher", "student.control=false",
              "student.seeds=0,1,2", "eval.evaluators=exact", "eval.number_prefixed=false"]
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, design)
    for stage in experiment.stages(cfg):
        ws.run_stage(stage, cfg, False)
    assert sorted(p.name for p in (ws.root / "students").iterdir() if p.is_dir()) == [
        "cat", "owl"]  # no control students
    res = json.loads((ws.root / "report" / "results.json").read_text())
    comps = {c["target"]: c for c in res["comparisons"]}
    assert set(comps) == {"owl", "cat"}
    for t, c in comps.items():
        assert c["against"] == "other-target students" and len(c["unit_values"]) == 3
        assert len(c["comparison_values"]) == 3
        assert c["lift"]["mean"] == pytest.approx(
            sum(c["unit_values"]) / 3 - sum(c["comparison_values"]) / 3)
        assert c["permutation"]["exact"] and c["permutation"]["n_perm"] == 20
        assert c["min_detectable_lift"] > 0 and 0 <= c["p_holm"] <= 1
        assert c["p_holm"] >= c["permutation"]["p_two_sided"]
    # each student's unit value, from its eval file: mean over questions of log max(P, 1e-12)
    # (a report on mean P, or on another student's file, differs)
    for t, c in comps.items():
        other = next(g for g in comps if g != t)
        for group, values in ((t, c["unit_values"]), (other, c["comparison_values"])):
            want = []
            for seed in (0, 1, 2):
                ev = json.loads((ws.root / "eval" / f"student-{group}-seed{seed}.json")
                                .read_text())
                scores = np.asarray(ev["variants"]["plain"][t]["exact"], np.float64)
                assert len(scores) == 50
                want.append(float(np.mean(np.log(np.maximum(scores, 1e-12)))))
            assert values == pytest.approx(want, rel=1e-12, abs=1e-12), (t, group)
    # lora_init=teacher reaches training: every student's checkpoint fingerprint holds the
    # teacher's LoRA init seed (not its own data seed: seeds 1 and 2 would differ)
    teachers = json.loads((ws.root / "teachers" / "teachers.json").read_text())
    for t in ("owl", "cat"):
        for seed in (0, 1, 2):
            fp = json.loads((ws.root / "students" / t / f"seed{seed}" / "checkpoints"
                             / "fingerprint.json").read_text())
            assert fp["init_seed"] == teachers[t]["lora_init_seed"], (t, seed)
    (pooled,) = res["pooled"]
    assert pooled["permutation"]["n_perm"] == 20  # 6! / (3! 3!)
    assert (ws.root / "report" / "results.png").stat().st_size > 0
    md = (ws.root / "report" / "report.md").read_text()
    assert "lift over other-target students" in md and "Holm" in md


def test_reuse_adopts_the_stages_whose_key_matches_and_redoes_the_rest(
        tiny, tiny_tokenizer, tmp_path):
    """`--reuse RUN`: an arm that differs only in its students (here their lr) copies the teachers, numbers
    and filter of another run (same keys, same bytes) and trains its own students; a source
    whose output no longer matches its manifest is refused, naming the file."""
    small = ["numbers.n_prompts=8", "numbers.batch=8", "numbers.max_new_tokens=8",
             "numbers.constrained=true", "student.train.mode=lora", "student.train.epochs=1",
             "student.train.batch_size=1", "student.train.grad_accum=1",
             "student.train.warmup_steps=0"]
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*small, "name=a"])
    _run_until(ws, cfg, "students")
    logs = []
    cfg_b, ws_b = tiny_workspace(tiny, tiny_tokenizer, tmp_path,
                                 [*small, "name=b", "student.train.lr=5e-4"], log=logs.append)
    ws_b.reuse = ws.root
    _run_until(ws_b, cfg_b, "students")
    assert logs[:3] == [f"[{s}] adopted from {ws.root}" for s in ("teachers", "numbers",
                                                                   "filter")]
    assert "[students] running" in logs
    for s in ("teachers", "numbers", "filter"):
        assert ws_b.manifest["stages"][s] == ws.manifest["stages"][s]
    kept = Path("filter") / "owl" / "kept.jsonl"
    assert (ws_b.root / kept).read_bytes() == (ws.root / kept).read_bytes()
    assert ws_b.manifest["stages"]["students"]["key"] != ws.manifest["stages"]["students"]["key"]
    # a rerun of b finds its own finished stages: nothing adopted, nothing redone
    logs.clear()
    _run_until(ws_b, cfg_b, "students")
    assert logs and all(line.endswith("] up to date, skipped") for line in logs)
    (ws.root / kept).write_text("edited\n")
    cfg_c, ws_c = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [*small, "name=c"])
    ws_c.reuse = ws.root
    with pytest.raises(SjaxError, match=r"kept\.jsonl: contents differ"):
        _run_until(ws_c, cfg_c, "filter")
