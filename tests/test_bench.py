"""Benchmark arithmetic against hand computations, and a tiny end-to-end bench run."""

import functools
import json
import math

import jax
import numpy as np
import jax.numpy as jnp
import pytest
from conftest import hf_to_sjax, tiny_hf_model

from sjax.bench import evaluate as bench_eval
from sjax.bench import sample as bench
from sjax.config import BenchConfig
from sjax.models.transformer import ArchConfig, forward, init_cache, logits_from_hidden
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


def dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, a scan's body counted `length` times."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracted)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                total += times * dot_flops(sub)
    return total


def test_ceiling_does_the_decode_steps_work(tiny_pair):
    """The ceiling, one real decode step and `decode_step_cost` count the same FLOPs:
    matmuls plus attention over the whole cache."""
    _, arch, params = tiny_pair
    b, context = 3, 20
    cache = init_cache(arch, b, context)

    def decode_step(p, tok_b1, c):  # one token at slot 9 of the cache, as the sampler's loop
        hidden, _ = forward(p, tok_b1, arch=arch, positions_bt=jnp.full((b, 1), 9),
                            kv_valid_bs=jnp.ones((b, context), bool), cache=c, write_index=9,
                            return_hidden=True)
        return logits_from_hidden(p, hidden, arch)

    step = jax.make_jaxpr(decode_step)(params, jnp.zeros((b, 1), jnp.int32), cache)
    chain = jax.make_jaxpr(functools.partial(bench.ceiling_chain, arch=arch))(
        params, jnp.ones((b, arch.d_model)), cache["k_lbskh"], cache["v_lbskh"])
    flops = bench.decode_step_cost(arch, b, context)[0]
    assert dot_flops(step.jaxpr) == dot_flops(chain.jaxpr) == flops
    assert flops > b * 2 * bench.matmul_params(arch)  # attention is in it
    out = bench.decode_matmul_ceiling(jax.tree.map(jnp.asarray, params), arch, b, context)
    assert out["flops"] == flops and out["repeats"] >= 3
    assert 0 < out["min_s"] <= out["median_s"]
    assert out["median_flop_s"] == pytest.approx(flops / out["median_s"])


def test_bench_sample_runs_on_a_tiny_model(tmp_path, tiny_tokenizer):
    hf_model = tiny_hf_model("qwen2")
    hf_model.save_pretrained(tmp_path)  # the transformers reference reads the same folder
    arch, params = hf_to_sjax(hf_model)
    m = LoadedModel(arch, jax.tree.map(jnp.asarray, params), tiny_tokenizer, tmp_path, 0.0)
    cfg = BenchConfig(batch_sizes=(2, 4), prompt_len=8, new_tokens=16, torch=True,
                      torch_dtypes=("float32",), repeats=3, out=str(tmp_path))
    out = bench.bench_sample(cfg, loaded=m)
    assert [(r["impl"], r["batch"]) for r in out["results"]] == [
        ("sjax", 2), ("transformers", 2), ("sjax", 4), ("transformers", 4)]
    for r in out["results"]:
        # prefill and decode each timed on its own: positive, and the rates are those times
        assert r["prefill_s"] > 0 and r["decode_s"] > 0
        assert r["decode_steps"] == 16
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * 16 / r["decode_s"])
        assert r["prefill_tok_s"] == pytest.approx(r["batch"] * 8 / r["prefill_s"])
        if r["impl"] == "sjax":
            assert r["decode_context"] == 8 + 16
            assert r["decode_of_ceiling"] == pytest.approx(
                r["decode_gflop_s"] / r["ceiling_median_gflop_s"])
            assert 0 < r["ceiling_median_gflop_s"] <= r["ceiling_max_gflop_s"]
    assert (tmp_path / "bench_sample.json").is_file()


def test_decode_is_timed_on_its_own_not_as_a_difference(monkeypatch):
    """The decode figure is the decode loop's own time: with a prefill slower than the
    decode, a `whole - prefill` subtraction would go negative; here each call is timed."""
    arch, params = hf_to_sjax(tiny_hf_model("llama"))
    timed = []

    def fake_time_call(fn, *args, **kw):  # prefill takes 5 arguments, the decode loop 6
        timed.append(len(args))
        return 1.0 if len(args) == 5 else 0.25

    monkeypatch.setattr(bench.perf, "time_call", fake_time_call)
    prompts = np.ones((2, 8), np.int32)
    pre_s, dec_s, steps = bench._time_ours(jax.tree.map(jnp.asarray, params), arch, prompts,
                                           4, jnp.float32, 3)
    assert (pre_s, dec_s, steps) == (1.0, 0.25, 4) and timed == [5, 6]


def test_bench_eval_times_the_exact_evaluator_on_a_tiny_model(tmp_path, tiny_tokenizer):
    arch, params = hf_to_sjax(tiny_hf_model("qwen2"))
    m = LoadedModel(arch, jax.tree.map(jnp.asarray, params), tiny_tokenizer, tmp_path, 0.0)
    cfg = BenchConfig(batch_sizes=(25,), eval_targets=("owl", "cat"), out=str(tmp_path))
    out = bench_eval.bench_eval(cfg, loaded=m)
    assert set(out["variants"]) == {"plain", "numbers"}
    for v in out["variants"].values():
        assert v["questions"] == 50 and v["exact_s"] > 0 and v["prefill_only_s"] > 0
    assert out["exact_s"] == pytest.approx(sum(v["exact_s"] for v in out["variants"].values()))
    assert json.loads((tmp_path / "bench_eval.json").read_text())["targets"] == ["owl", "cat"]

