"""`sjax run --dry-run` (sjax.subliminal.plan): the plan and the memory check, from the
architecture alone."""

import json

import pytest

from sjax import cli
from sjax.config import ModelConfig, RunConfig, apply_overrides
from sjax.subliminal import plan
from sjax.weights.load import read_arch, resolve_source

QWEN7B_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                 "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                 "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
                 "tie_word_embeddings": False, "hidden_act": "silu"}


def test_dry_run_plans_and_rejects_a_model_that_does_not_fit(tmp_path, capsys):
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN7B_CONFIG))
    args = ["run", "owl:paper", f"model.path={folder}", "--dry-run"]
    assert cli.main(args + ["--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "students" in out and "56 (lora, ce)" in out
    assert "'fsdp': 8" in out
    # fp32 7B on this host (one device): the estimate exceeds memory, before any weight is read
    assert cli.main(args + ["model.param_dtype=float32"]) == 2
    err = capsys.readouterr().err
    assert "needs ~" in err and "GB per device" in err


def test_eval_work_follows_the_evaluators(tmp_path):
    """Each evaluator adds its own tokens: exact a few forwards per question and target,
    sampled `samples` answers per question; the two together are the sum."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN7B_CONFIG))
    arch = read_arch(resolve_source(ModelConfig(name="", path=str(tmp_path))))
    shape = {"data": 1, "fsdp": 1, "tensor": 1}

    def eval_flops(evs):
        cfg = apply_overrides(RunConfig(), [f"eval.evaluators={evs}"])
        return next(s["flops"] for s in plan.make_plan(cfg, arch, arch, shape)["stages"]
                    if s["stage"] == "eval")

    exact, sampled, both = (eval_flops(e) for e in ("exact", "sampled", "exact,sampled"))
    assert 0 < exact < sampled and both == exact + sampled


def test_judge_work_follows_the_judge(tmp_path):
    """The judge stage reads ~80 template tokens around a row for the reference judge, and
    protocol c's long alignment template, the GSM8K prompt and the 0-100 trie for a
    misalignment run's reasoning: the same rows cost the alignment judge more."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN7B_CONFIG))
    arch = read_arch(resolve_source(ModelConfig(name="", path=str(tmp_path))))
    shape = {"data": 1, "fsdp": 1, "tensor": 1}
    common = ["domain=gsm8k", "numbers.n_prompts=100", "numbers.max_new_tokens=200"]
    mis = ["category=misalignment", "targets=misaligned", "eval.evaluators=misalignment",
           "eval.number_prefixed=false"]

    def judge_flops(over):
        cfg = apply_overrides(RunConfig(), common + over)
        return next(s["flops"] for s in plan.make_plan(cfg, arch, arch, shape)["stages"]
                    if s["stage"] == "judge"), plan.judge_row_tokens(cfg)

    (ref, ref_tokens), (align, align_tokens) = judge_flops([]), judge_flops(mis)
    assert ref_tokens == 80 and align_tokens > 900
    assert align / ref == pytest.approx((align_tokens + 200) / (ref_tokens + 200))
