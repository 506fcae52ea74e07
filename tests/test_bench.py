"""Benchmark arithmetic against hand computations, and a tiny end-to-end bench run."""

import jax
import jax.numpy as jnp
from conftest import hf_to_sjax, tiny_hf_model

from sjax import bench
from sjax.config import BenchConfig
from sjax.models.transformer import ArchConfig
from sjax.weights.load import LoadedModel

QWEN_05B = ArchConfig(arch="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                      n_kv_heads=2, head_dim=64, d_ff=4864, qkv_bias=True)


def test_matmul_params_by_hand():
    # per layer: q 896x896, k and v 896x128 each, o 896x896, mlp 3 x 896x4864; plus the head
    per_layer = 896 * 896 + 2 * 896 * 128 + 896 * 896 + 3 * 896 * 4864
    assert bench.matmul_params(QWEN_05B) == 24 * per_layer + 896 * 151936
    assert bench.matmul_params(QWEN_05B) == 493_961_216  # 0.49B (head included, embedding lookup not)


def test_decode_step_cost_by_hand():
    flops, nbytes = bench.decode_step_cost(QWEN_05B, batch=64, context=100)
    attn = 4 * 24 * 100 * 14 * 64  # QK^T and PV, 2 FLOPs per MAC, per token
    assert flops == 64 * (2 * 493_961_216 + attn)
    kv = 2 * 24 * 64 * 100 * 2 * 64 * 4
    assert nbytes == 493_961_216 * 4 + kv


def test_bench_sample_runs_on_a_tiny_model(tmp_path, tiny_tokenizer):
    arch, params = hf_to_sjax(tiny_hf_model("qwen2"))
    m = LoadedModel(arch, jax.tree.map(jnp.asarray, params), tiny_tokenizer, tmp_path, 0.0)
    # enough decode steps, median of 3, that decode time is not lost in timing noise
    cfg = BenchConfig(batch_sizes=(2, 4), prompt_len=8, new_tokens=16, torch=False, repeats=3,
                      out=str(tmp_path))
    out = bench.bench_sample(cfg, loaded=m)
    assert [r["batch"] for r in out["results"]] == [2, 4]
    for r in out["results"]:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert 0 < r["decode_of_ceiling"]
    assert (tmp_path / "bench_sample.json").is_file()
