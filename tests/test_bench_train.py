"""`bench train` checks itself: sjax and torch+peft must agree on the step-1 loss."""

import dataclasses

import pytest
from conftest import tiny_hf_model

from sjax.bench import train as bench_train
from sjax.config import BenchConfig, ModelConfig
from sjax.errors import SjaxError


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_tokenizer):
    """Real sjax and torch(+peft) worker results, one step each, on a tiny HF folder."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_hf_model("qwen2").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    cfg = BenchConfig(model=ModelConfig(path=str(folder)), train_batch=8, train_seq=16,
                      train_steps=1, train_runs=("full:float32:none", "lora:bfloat16:none"))
    results = []
    for job in bench_train.train_jobs(cfg):
        worker = bench_train.sjax_worker if job["impl"] == "sjax" else bench_train.torch_worker
        results.append(job | worker(job))
    return results


def test_torch_runs_each_mode_in_fp32_and_bf16_lora_in_bf16():
    cfg = BenchConfig(train_runs=("full:float32:none", "full:bfloat16:none",
                                  "lora:float32:none", "lora:bfloat16:full"))
    jobs = bench_train.train_jobs(cfg)
    assert [(j["mode"], j["dtype"]) for j in jobs if j["impl"] == "torch"] == [
        ("full", "float32"), ("lora", "float32"), ("lora", "bfloat16")]
    assert not [j for j in bench_train.train_jobs(dataclasses.replace(cfg, torch=False))
                if j["impl"] == "torch"]


def test_step1_losses_agree_on_a_tiny_model(tiny_runs):
    by = {(r["impl"], r["mode"], r["dtype"]): r["losses"][0] for r in tiny_runs}
    assert set(by) == {("sjax", "full", "float32"), ("sjax", "lora", "bfloat16"),
                       ("torch", "full", "float32"), ("torch", "lora", "float32"),
                       ("torch", "lora", "bfloat16")}
    # fp32 agrees far inside its tolerance; bf16 differs from fp32 (another precision) but
    # agrees with torch's bf16 inside its own; LoRA starts at the base model (B = 0)
    assert by["sjax", "full", "float32"] == pytest.approx(by["torch", "full", "float32"], rel=1e-5)
    assert by["torch", "lora", "float32"] == pytest.approx(by["torch", "full", "float32"], rel=1e-6)
    assert by["sjax", "lora", "bfloat16"] == pytest.approx(by["torch", "lora", "bfloat16"],
                                                           rel=bench_train.LOSS_RTOL["bfloat16"])
    assert by["sjax", "lora", "bfloat16"] != by["sjax", "full", "float32"]
    bench_train.check_losses(tiny_runs)  # passes: nothing raised


@pytest.mark.parametrize("mode,dtype", [("full", "float32"), ("lora", "bfloat16")])
def test_a_reference_loss_off_by_twice_the_tolerance_fails(tiny_runs, mode, dtype):
    rtol = bench_train.LOSS_RTOL[dtype]
    perturbed = [r | {"losses": [r["losses"][0] * (1 + 2 * rtol)]}
                 if (r["impl"], r["mode"], r["dtype"]) == ("torch", mode, dtype) else r
                 for r in tiny_runs]
    with pytest.raises(SjaxError, match=f"step-1 loss of sjax {mode} {dtype}"):
        bench_train.check_losses(perturbed)
