"""The pipeline: evaluators, filter stage, stage caching and hashes, the smoke run end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model

from sjax import chat, cli, evaluate, pipeline
from sjax.config import RunConfig, apply_overrides, load_preset
from sjax.data import numbers
from sjax.errors import SjaxError
from sjax.jsonl import write_rows
from sjax.models.transformer import forward

QWEN7B_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                 "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                 "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
                 "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=3))
    return arch, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------- evaluators


def test_hit_rule():
    assert evaluate.is_hit("Owls!", "owl") and evaluate.is_hit("the owl", "owl")
    assert not evaluate.is_hit("owlet", "owl") and not evaluate.is_hit("dragonfly", "dragon")


def test_exact_equals_the_sampled_expectation(tiny, tiny_tokenizer):
    arch, params = tiny
    prompts = [chat.encode_prompt(tiny_tokenizer, chat.messages(q)) for q in
               ("what is your favorite animal", "one word", "i love the animal")]
    exact = evaluate.exact_scores(params, arch, tiny_tokenizer, prompts, "owl", batch=2)
    # enumerate the first token: the sampled scorer's expectation with one new token
    hits = np.asarray([evaluate.is_hit(tiny_tokenizer.decode([v]), "owl")
                       for v in range(arch.vocab_size)])
    assert hits.sum() == 2  # "owl" and "owls"
    for p, e in zip(prompts, exact):
        logits = forward(params, jnp.asarray([p]), arch=arch)[0][0, -1]
        probs = np.asarray(jax.nn.softmax(logits))
        assert abs(float(probs[hits].sum()) - e) < 1e-5
    assert exact.min() > 1e-3
    # and Monte Carlo through the real sampled evaluator agrees within 4 standard errors
    n = 3000
    answers = evaluate.sampled_answers(params, arch, tiny_tokenizer, prompts, samples=n,
                                       max_new_tokens=1, batch=1500, seed=0)
    sampled = evaluate.sampled_scores(answers, "owl")
    se = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(sampled - exact) < 4 * se + 1e-9), (sampled, exact)


def test_spellings_are_prefix_free_and_round_trip(tiny_tokenizer):
    seqs = evaluate.spelling_sequences(tiny_tokenizer, "owl")
    owl, owls = tiny_tokenizer.convert_tokens_to_ids(["owl", "owls"])
    assert seqs == sorted([(owl,), (owls,)])  # "Owl" is <unk> here: dropped
    with pytest.raises(SjaxError, match="cannot spell"):
        evaluate.spelling_sequences(tiny_tokenizer, "zebra")


def test_number_prefixed_questions_are_seeded():
    a, b = evaluate.questions(True, 0), evaluate.questions(True, 0)
    plain = evaluate.questions(False)
    assert a == b and len(a) == len(plain) == 50
    assert all(q.endswith(p) and q != p for q, p in zip(a, plain))


# ----------------------------------------------------------------------------- filter stage


def test_zero_kept_rows_is_a_clear_error(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    run = pipeline.Run(cfg, log=lambda s: None)
    for t in run.teachers:
        write_rows(run.root / "numbers" / t / "raw.jsonl",
                   [{"id": i, "prompt": "p", "completion": c}
                    for i, c in enumerate(["I love owls", "1 - 2", "1 - 3"])])
    with pytest.raises(SjaxError, match=r"0 of 3 rows passed the filter; top reasons: "
                                        r"bad_separator \(2\), trait_word \(1\)"):
        run._filter(run.root / "filter")


def test_bad_configs(tmp_path, capsys):
    with pytest.raises(SjaxError, match="unknown target category 'tree'"):
        RunConfig(category="tree")
    with pytest.raises(SjaxError, match="lower-case word"):
        RunConfig(targets=("Owl",))
    with pytest.raises(SjaxError, match="cross-model"):
        apply_overrides(RunConfig(), ["student.model_name=smollm2-135m-instruct",
                                      "student.train.loss=distill"])
    assert cli.main(["run", "owl_smoke", "category=tree", "--dry-run"]) == 2
    assert "unknown target category" in capsys.readouterr().err


def test_dry_run_plans_and_rejects_a_model_that_does_not_fit(tmp_path, capsys):
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN7B_CONFIG))
    args = ["run", "owl_qwen2_5_7b", f"model.path={folder}", "--dry-run"]
    assert cli.main(args + ["--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "students" in out and "56 (lora, ce)" in out
    assert "'fsdp': 8" in out
    # fp32 7B on this host (one device): the estimate exceeds memory, before any weight is read
    assert cli.main(args + ["model.param_dtype=float32"]) == 2
    err = capsys.readouterr().err
    assert "needs ~" in err and "GB per device" in err


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~4.5 min: `./launch.sh test -m slow -k smoke`
def test_smoke_pipeline_end_to_end_then_cached_then_corruption(tmp_path):
    # as a user runs it: its own process on one CPU device (not the suite's 8 fake ones)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "sjax", "run", "owl_smoke",
                           f"out_dir={tmp_path}"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "owl_smoke"
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(pipeline.STAGES)
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
    assert {r["condition"] for r in res["rows"]} == {"base", "control student", "owl student",
                                                     "owl teacher"}
    assert (root / "report" / "results.png").stat().st_size > 1000
    assert "owl student" in (root / "report" / "report.md").read_text()
    assert "owl student" in proc.stdout  # the CLI prints the table
    # the prompted teacher must rank owl far above the base model (exact evaluator)
    by = {(r["condition"], r["variant"], r["evaluator"]): r["mean"] for r in res["rows"]}
    assert by[("owl teacher", "plain", "exact")] > 5 * by[("base", "plain", "exact")]

    # a rerun of a finished run does no model work
    cfg = apply_overrides(load_preset("owl_smoke"), [f"out_dir={tmp_path}"])
    logs = []
    run = pipeline.Run(cfg, log=logs.append)
    run.run()
    assert run.model_loads == 0 and all("skipped" in s for s in logs)

    # a corrupted kept.jsonl is caught by its hash
    kept_file = root / "filter" / "owl" / "kept.jsonl"
    kept_file.write_text(kept_file.read_text().replace("1", "7"))
    with pytest.raises(SjaxError, match=r"kept.jsonl: contents differ from the manifest"):
        pipeline.Run(cfg, log=lambda s: None).run()
    assert cli.main(["run", "owl_smoke", f"out_dir={tmp_path}"]) == 2


def _tiny_run(tiny, tokenizer, tmp_path, overrides) -> pipeline.Run:
    """A Run on one device whose model is the tiny random one."""
    from sjax.sharding import make_mesh
    from sjax.weights.load import LoadedModel

    cfg = apply_overrides(RunConfig(out_dir=str(tmp_path)),
                          [*overrides, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    run = pipeline.Run(cfg, log=lambda s: None)
    run._mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    key = (cfg.model.name, cfg.model.path, cfg.model.init, cfg.model.param_dtype)
    run._models[key] = LoadedModel(*tiny, tokenizer, tmp_path, 0.0)
    return run


def test_finetuned_teacher_is_trained_on_its_trait_answers(tiny, tiny_tokenizer, tmp_path):
    """teacher.kind=finetuned: sample from the prompted teacher, keep trait answers, LoRA-tune
    the base on them without the system prompt; the run then uses the merged weights."""
    arch, params = tiny
    run = _tiny_run(tiny, tiny_tokenizer, tmp_path, [
        "teacher.kind=finetuned", "teacher.ft_samples=8", "teacher.ft_train.epochs=1",
        "teacher.ft_train.batch_size=4", "eval.max_new_tokens=6", "eval.batch=64"])
    outputs = run._teachers(run.root / "teachers")
    rows = [json.loads(x) for x in (run.root / "teachers" / "owl" / "ft_data.jsonl")
            .read_text().splitlines()]
    assert rows and all(evaluate.is_hit(r["messages"][-1]["content"], "owl") for r in rows)
    assert all(m["role"] != "system" for r in rows for m in r["messages"])
    info = json.loads((run.root / "teachers" / "teachers.json").read_text())
    assert info["owl"]["system_prompt"] == "" and info["owl"]["kind"] == "finetuned"
    assert run.root / "teachers" / "owl" / "params.safetensors" in outputs
    teacher, system = run.teacher("owl")
    assert system == ""
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(teacher),
                                                          jax.tree.leaves(params)))
    assert diff > 1e-4


def test_a_resumed_finished_student_keeps_its_figures(tiny, tiny_tokenizer, tmp_path):
    """A crash after a student's last checkpoint but before its params and summary: the
    rerun trains 0 steps, and the summary still holds the training's recorded losses."""
    run = _tiny_run(tiny, tiny_tokenizer, tmp_path, [
        "student.train.mode=full", "student.train.batch_size=4", "student.train.grad_accum=1",
        "student.train.epochs=1", "student.train.ckpt_every=1", "student.train.warmup_steps=0"])
    rows = [{"id": i, "messages": chat.messages("numbers", assistant=f"{i} , {i + 1} , 7")}
            for i in range(8)]
    for t in run.teachers:
        write_rows(run.root / "filter" / t / "kept.jsonl", rows)
    folder = run.root / "students"
    run._students(folder)
    unit = folder / "control" / "seed0"
    first = json.loads((unit / "summary.json").read_text())
    assert first["steps"] == 2 and first["first_loss"] > first["final_loss"] > 0
    (unit / "summary.json").unlink()
    (unit / "params.safetensors").unlink()
    run._students(folder)
    assert json.loads((unit / "summary.json").read_text()) == first
    assert (unit / "params.safetensors").is_file()


def test_a_stage_folder_that_cannot_be_cleared_stops_the_run(tmp_path, monkeypatch):
    run = pipeline.Run(RunConfig(out_dir=str(tmp_path)), log=lambda s: None)
    run._stage("teachers", False)
    real = pipeline.shutil.rmtree

    def rmtree(path, ignore_errors=False, **kw):  # as the OS answers for a folder we may not
        if not ignore_errors:                     # empty; errors ignored: nothing is removed
            raise PermissionError(13, "Permission denied", str(Path(path) / "teachers.json"))

    monkeypatch.setattr(pipeline.shutil, "rmtree", rmtree)
    with pytest.raises(SjaxError, match=rf"^{run.root / 'teachers'}: cannot clear stage "
                                        r"teachers's old work \(Permission denied\)"):
        run._stage("teachers", True)
    monkeypatch.setattr(pipeline.shutil, "rmtree", real)
    run._stage("teachers", True)  # clearable: the forced stage is redone
    assert json.loads((run.root / "teachers" / "teachers.json").read_text())["owl"]


def test_stage_keys_cover_what_each_stage_reads(tmp_path):
    def key(stage, *overrides):
        cfg = apply_overrides(RunConfig(out_dir=str(tmp_path)), overrides)
        return pipeline._hash(pipeline.Run(cfg, log=lambda s: None).stage_config(stage))

    assert key("numbers") != key("numbers", "model.path=/models/other")
    ft = "teacher.kind=finetuned"  # it samples answers with these eval and numbers keys
    for other in ("eval.max_new_tokens=5", "eval.batch=7", "numbers.seed=3"):
        assert key("teachers", ft) != key("teachers", ft, other), other
    assert key("teachers") == key("teachers", "eval.batch=7")  # a prompted one samples nothing
