"""Throughput benchmarks, each against transformers on the same workload in the same run.

`sjax bench sample`: prefill and decode tokens/s for each batch size, each timed on its own
(the sampler's jitted prefill, then its jitted decode loop), against transformers (torch
CPU, fp32 and bf16) on identical prompts timed the same way, and a roofline: FLOPs and bytes
per decode step against a measured ceiling, a jitted chain of exactly the decode step's
matmuls, attention over the same cache included, at that batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sjax import perf, report, sampling
from sjax.config import BenchConfig
from sjax.files import atomic_write_json
from sjax.bench.torch_ref import torch_device, torch_model, torch_sync
from sjax.models.transformer import (ArchConfig, attention, head_matrix_dv, matmul_params,
                                     mm)
from sjax.sharding import make_mesh
from sjax.weights.load import load_model

TIMING = ("prefill: the prompts' forward pass into the KV cache; decode: new_tokens greedy "
          "steps of one-token forwards on that cache; each timed alone after a warm-up "
          "(sjax: the sampler's jitted prefill and its jitted decode loop; transformers: "
          "model(...) with use_cache, then the same loop of cached forwards that generate "
          "runs, without its logits processors)")


def decode_step_cost(arch: ArchConfig, batch: int, context: int, bytes_per_param: int = 4):
    """(FLOPs, bytes) of one decode step attending over `context` cache slots."""
    attn_flops = 4 * arch.n_layers * context * arch.n_heads * arch.head_dim
    flops = batch * (2 * matmul_params(arch) + attn_flops)
    kv_bytes = 2 * arch.n_layers * batch * context * arch.n_kv_heads * arch.head_dim
    return flops, (matmul_params(arch) + kv_bytes) * bytes_per_param


def ceiling_chain(params, x_bd, k_lbskh, v_lbskh, *, arch: ArchConfig):
    """The decode step's matmuls alone (same shapes and weights): q/k/v/o, attention over
    the given cache (this step's k, v written at slot 0, as decoding writes them), MLP, head."""
    mask_b1s = jnp.ones((x_bd.shape[0], 1, k_lbskh.shape[2]), bool)

    def layer(x, xs):
        p, k_bskh, v_bskh = xs
        q = mm("bd,dnh->bnh", x, p["wq_ldnh"])
        k_bskh = k_bskh.at[:, 0].set(mm("bd,dkh->bkh", x, p["wk_ldkh"]))
        v_bskh = v_bskh.at[:, 0].set(mm("bd,dkh->bkh", x, p["wv_ldkh"]))
        a_bnh = attention(q[:, None], k_bskh, v_bskh, mask_b1s)[:, 0]
        x = x + mm("bnh,nhd->bd", a_bnh, p["wo_lnhd"])
        g = jax.nn.silu(mm("bd,df->bf", x, p["wg_ldf"])) * mm("bd,df->bf", x, p["wu_ldf"])
        return x + mm("bf,fd->bd", g, p["wd_lfd"]), None

    x, _ = jax.lax.scan(layer, x_bd, (params["layers"], k_lbskh, v_lbskh))
    return mm("bd,dv->bv", x, head_matrix_dv(params, arch))


def decode_matmul_ceiling(params, arch: ArchConfig, batch: int, context: int,
                          dtype=jnp.float32, repeats: int = 3) -> dict:
    """`ceiling_chain` timed `repeats` times after a warm-up: {flops per step (those of
    `decode_step_cost`, the same work), min and median seconds and FLOP/s}."""
    x = jnp.ones((batch, arch.d_model), dtype) * 0.01
    kv = jnp.full((arch.n_layers, batch, context, arch.n_kv_heads, arch.head_dim), 0.01, dtype)
    f = jax.jit(functools.partial(ceiling_chain, arch=arch))
    times = [perf.time_call(f, params, x, kv, kv, warmup=2 if i == 0 else 0, repeats=1)
             for i in range(repeats)]
    flops = decode_step_cost(arch, batch, context)[0]
    best, median = min(times), float(np.median(times))
    return {"flops": flops, "min_s": best, "median_s": median, "repeats": repeats,
            "max_flop_s": flops / best, "median_flop_s": flops / median}


def _time_ours(params, arch, prompts, new_tokens, dtype, repeats):
    """(prefill s, decode s, decode steps): the sampler's compiled prefill and decode loop,
    each run once as warm-up, then timed alone (median of `repeats`)."""
    b, t = prompts.shape
    pad = jnp.int32(0)
    pre_args = (params, jnp.asarray(prompts), jnp.ones((b, t), bool), pad, None)
    prefill = sampling.prefill.lower(*pre_args, arch=arch, max_new_tokens=new_tokens,
                                      dtype=dtype).compile()
    state = jax.block_until_ready(prefill(*pre_args))
    dec_args = (params, state, jax.vmap(jax.random.key)(jnp.arange(b)),
                jnp.zeros((0,), jnp.int32), pad, None)  # no stop ids: every step runs
    decode = sampling.decode_loop.lower(*dec_args, arch=arch, strategy=sampling.Greedy(),
                                    dtype=dtype).compile()
    steps = int(decode(*dec_args).step)
    return (perf.time_call(prefill, *pre_args, warmup=0, repeats=repeats),
            perf.time_call(decode, *dec_args, warmup=0, repeats=repeats), steps)


def _time_transformers(source, prompts, new_tokens, dtype_name, repeats):
    """(prefill s, decode s, torch threads): as `_time_ours`, through transformers."""
    import torch  # lazy: optional (the test extra), only the reference runs need it

    model = torch_model(source).eval().to(getattr(torch, dtype_name))

    def prefill(ids):  # logits of the last position only, as generate (and sjax) compute
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                     logits_to_keep=1)

    def decode(ids, out, n):
        cache, mask = out.cache, torch.ones_like(ids)
        for _ in range(n):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = model(input_ids=tok, attention_mask=mask, cache=cache, use_cache=True)
        assert cache.get_seq_length() == ids.shape[1] + n

    ids = torch.tensor(prompts, device=torch_device())
    pre, dec = [], []
    with torch.no_grad():
        decode(ids[:4], prefill(ids[:4]), 2)  # warm-up (thread pools, oneDNN) on a few rows
        for _ in range(repeats):  # the cache grows in place: a fresh prefill per decode
            torch_sync()
            t0 = time.perf_counter()
            out = prefill(ids)
            torch_sync()
            t1 = time.perf_counter()
            decode(ids, out, new_tokens)
            torch_sync()
            pre.append(t1 - t0)
            dec.append(time.perf_counter() - t1)
    return float(np.median(pre)), float(np.median(dec)), torch.get_num_threads()


def _rates(impl, dtype, b, prompt_len, prefill_s, decode_s, steps) -> dict:
    return {"impl": impl, "dtype": dtype, "batch": b, "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_steps": steps,
            "prefill_tok_s": b * prompt_len / prefill_s, "decode_tok_s": b * steps / decode_s,
            "decode_step_ms": 1e3 * decode_s / steps}


def bench_sample(cfg: BenchConfig, loaded=None) -> dict:

    m = loaded or load_model(cfg.model, make_mesh(cfg.mesh))
    dtype = jnp.dtype(cfg.model.dtype)
    dev = jax.devices()[0]
    peak = perf.matmul_peak() if dev.platform == "cpu" else perf.device_peak()[0]
    rng = np.random.default_rng(0)
    rows, results = [], []
    # every decode step attends over the whole cache (prompt + new tokens, masked)
    context = cfg.prompt_len + cfg.new_tokens
    for b in cfg.batch_sizes:
        prompts = rng.integers(0, min(m.arch.vocab_size, 30000), (b, cfg.prompt_len)).astype(np.int32)
        ours = _rates("sjax", cfg.model.dtype, b, cfg.prompt_len,
                      *_time_ours(m.params, m.arch, prompts, cfg.new_tokens, dtype, cfg.repeats))
        flops, nbytes = decode_step_cost(m.arch, b, context, dtype.itemsize)
        ceiling = decode_matmul_ceiling(m.params, m.arch, b, context, dtype)
        ours |= {"decode_gflop_s": flops / (ours["decode_s"] / ours["decode_steps"]) / 1e9,
                 "decode_step_gflop": flops / 1e9, "decode_step_gbytes": nbytes / 1e9,
                 "decode_context": context,
                 "ceiling_max_gflop_s": ceiling["max_flop_s"] / 1e9,
                 "ceiling_median_gflop_s": ceiling["median_flop_s"] / 1e9,
                 "ceiling_repeats": ceiling["repeats"],
                 "square_matmul_peak_gflop_s": peak / 1e9}
        ours["decode_of_ceiling"] = ours["decode_gflop_s"] * 1e9 / ceiling["median_flop_s"]
        results.append(ours)
        if cfg.torch:
            for dt in cfg.torch_dtypes:
                h1, hn, threads = _time_transformers(m.source, prompts, cfg.new_tokens, dt,
                                                     cfg.repeats)
                results.append(_rates("transformers", dt, b, cfg.prompt_len, h1, hn,
                                      cfg.new_tokens) | {"torch_threads": threads})
    for r in results:
        base = next((x for x in results if x["impl"] == "transformers" and x["batch"] == r["batch"]
                     and x["dtype"] == r["dtype"]), None) if r["impl"] == "sjax" else None
        speedup = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
        rows.append((r["impl"], r["dtype"], r["batch"], f"{r['prefill_tok_s']:.0f}",
                     f"{r['decode_tok_s']:.1f}", speedup,
                     f"{100 * r['decode_of_ceiling']:.0f}%" if "decode_of_ceiling" in r else ""))
    table = report.markdown_table(("impl", "dtype", "batch", "prefill tok/s", "decode tok/s",
                                   "decode vs transformers", "decode / matmul ceiling"), rows)
    out = {"what": "sample", "model": m.source.name, "device": f"{jax.device_count()} x "
           f"{dev.device_kind}", "config": dataclasses.asdict(cfg), "timing": TIMING,
           "ceiling": "a jitted chain of the decode step's matmuls and attention over the "
                      "same cache (the same FLOPs), median of 3 after a warm-up",
           "results": results, "table": table}
    atomic_write_json(f"{cfg.out}/bench_sample.json", out)
    print(table)
    return out
