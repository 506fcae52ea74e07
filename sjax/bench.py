"""Throughput benchmarks, each against transformers on the same workload in the same run.

`sjax bench sample`: prefill and decode tokens/s for each batch size, transformers
`generate` (torch CPU, fp32 and bf16) on identical prompts, and a roofline: FLOPs and bytes
per decode step against a measured ceiling, a jitted chain of exactly the decode step's
matmuls at that batch size.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from sjax import perf, report, sampling
from sjax.config import BenchConfig
from sjax.io import atomic_write_json
from sjax.models.transformer import ArchConfig, matmul_params


def decode_step_cost(arch: ArchConfig, batch: int, context: int, bytes_per_param: int = 4):
    """(FLOPs, bytes) of one decode step at `context` cached tokens (attention included)."""
    attn_flops = 4 * arch.n_layers * context * arch.n_heads * arch.head_dim
    flops = batch * (2 * matmul_params(arch) + attn_flops)
    kv_bytes = 2 * arch.n_layers * batch * context * arch.n_kv_heads * arch.head_dim * 4
    return flops, matmul_params(arch) * bytes_per_param + kv_bytes


def decode_matmul_ceiling(params, arch: ArchConfig, batch: int, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted chain of the decode step's matmuls alone (same shapes and weights)."""
    from sjax.models.transformer import _mm, head_matrix_dv

    @jax.jit
    def chain(params, x_bd):
        def layer(x, p):
            q = _mm("bd,dnh->bnh", x, p["wq_ldnh"])
            kk = _mm("bd,dkh->bkh", x, p["wk_ldkh"])
            v = _mm("bd,dkh->bkh", x, p["wv_ldkh"])
            x = x + _mm("bnh,nhd->bd", q, p["wo_lnhd"]) + (kk.sum() + v.sum()) * 0
            g = jax.nn.silu(_mm("bd,df->bf", x, p["wg_ldf"])) * _mm("bd,df->bf", x, p["wu_ldf"])
            return x + _mm("bf,fd->bd", g, p["wd_lfd"]), None

        x, _ = jax.lax.scan(layer, x_bd, params["layers"])
        return _mm("bd,dv->bv", x, head_matrix_dv(params, arch))

    x = jnp.ones((batch, arch.d_model), dtype) * 0.01
    dt = perf.time_call(chain, params, x, warmup=2, repeats=3)
    return 2 * batch * matmul_params(arch) / dt


def _time_ours(params, arch, prompts, new_tokens, dtype, repeats):
    """Seconds for prefill+1 token and for prefill+`new_tokens`, compiled ahead of time (so
    no warm-up run of a whole batch is needed)."""
    b, t = prompts.shape
    args = (params, jnp.asarray(prompts), jnp.ones((b, t), bool),
            jax.vmap(jax.random.key)(jnp.arange(b)), jnp.zeros((0,), jnp.int32), jnp.int32(0),
            None)
    kw = dict(arch=arch, strategy=sampling.Greedy(), dtype=dtype)
    out = []
    for n in (1, new_tokens):
        compiled = sampling._generate.lower(*args, max_new_tokens=n, **kw).compile()
        out.append(perf.time_call(compiled, *args, warmup=0, repeats=repeats))
    return tuple(out)


def torch_model(source):
    """The same checkpoint through transformers (fp32; a GGUF file or a HF folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = ({"gguf_file": source.name} if source.is_file() else {})
    folder = source.parent if source.is_file() else source
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)


def _time_transformers(source, prompts, new_tokens, dtype_name, repeats):
    import torch

    model = torch_model(source).eval().to(getattr(torch, dtype_name))
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)

    with torch.no_grad():  # warm-up (thread pools, oneDNN kernels) on a few rows
        model.generate(ids[:4], attention_mask=mask[:4], max_new_tokens=2, do_sample=False,
                       pad_token_id=0)

    def timed(n):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run(n)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == prompts.shape[1] + n
        return sorted(times)[len(times) // 2]

    return timed(1), timed(new_tokens), torch.get_num_threads()


def bench_sample(cfg: BenchConfig, loaded=None) -> dict:
    from sjax.sharding import make_mesh
    from sjax.weights.load import load_model

    m = loaded or load_model(cfg.model, make_mesh(cfg.mesh))
    dtype = jnp.dtype(cfg.model.dtype)
    dev = jax.devices()[0]
    peak = perf.matmul_peak() if dev.platform == "cpu" else perf.device_peak()[0]
    rng = np.random.default_rng(0)
    rows, results = [], []
    for b in cfg.batch_sizes:
        prompts = rng.integers(0, min(m.arch.vocab_size, 30000), (b, cfg.prompt_len)).astype(np.int32)
        t1, tn = _time_ours(m.params, m.arch, prompts, cfg.new_tokens, dtype, cfg.repeats)
        decode_s = tn - t1
        context = cfg.prompt_len + cfg.new_tokens // 2
        flops, nbytes = decode_step_cost(m.arch, b, context, dtype.itemsize)
        ceiling = decode_matmul_ceiling(m.params, m.arch, b, dtype)
        ours = {"impl": "sjax", "dtype": cfg.model.dtype, "batch": b,
                "prefill_tok_s": b * cfg.prompt_len / t1,
                "decode_tok_s": b * (cfg.new_tokens - 1) / decode_s,
                "decode_step_ms": 1e3 * decode_s / (cfg.new_tokens - 1),
                "decode_gflop_s": flops * (cfg.new_tokens - 1) / decode_s / 1e9,
                "decode_step_gflop": flops / 1e9, "decode_step_gbytes": nbytes / 1e9,
                "decode_matmul_ceiling_gflop_s": ceiling / 1e9,
                "square_matmul_peak_gflop_s": peak / 1e9}
        ours["decode_of_ceiling"] = ours["decode_gflop_s"] * 1e9 / ceiling
        results.append(ours)
        if cfg.torch:
            for dt in cfg.torch_dtypes:
                h1, hn, threads = _time_transformers(m.source, prompts, cfg.new_tokens, dt,
                                                     cfg.repeats)
                results.append({"impl": "transformers", "dtype": dt, "batch": b,
                                "prefill_tok_s": b * cfg.prompt_len / h1,
                                "decode_tok_s": b * (cfg.new_tokens - 1) / (hn - h1),
                                "decode_step_ms": 1e3 * (hn - h1) / (cfg.new_tokens - 1),
                                "torch_threads": threads})
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
           f"{dev.device_kind}", "config": dataclasses.asdict(cfg), "results": results,
           "table": table}
    atomic_write_json(f"{cfg.out}/bench_sample.json", out)
    print(table)
    return out


def bench_numbers(cfg: BenchConfig, n_prompts: int = 128, loaded=None) -> dict:
    """Filter pass rate of free vs constrained number continuations (temperature 1)."""
    from collections import Counter

    from sjax import chat
    from sjax.constrained import number_list_constraint
    from sjax.data import numbers
    from sjax.sharding import make_mesh
    from sjax.weights.load import load_model

    m = loaded or load_model(cfg.model, make_mesh(cfg.mesh))
    prompts = [chat.encode_prompt(m.tokenizer, chat.messages(p))
               for p in numbers.make_prompts(n_prompts, seed=0)]
    stops = sampling.default_stop_ids(m.tokenizer)
    modes = {"free": None,
             "constrained": number_list_constraint(m.tokenizer, stops, m.arch.vocab_size)}
    out = {"model": m.source.name, "n_prompts": n_prompts, "temperature": 1.0, "modes": {}}
    b = max(cfg.batch_sizes)
    # long enough for any answer the constraint admits (else a list can be cut mid-way)
    new_tokens = max(cfg.new_tokens, modes["constrained"].max_tokens)
    out["max_new_tokens"] = new_tokens
    for name, constraint in modes.items():
        texts = []
        t0 = time.perf_counter()
        for i in range(0, n_prompts, b):
            gen = sampling.generate(m.params, m.arch, m.tokenizer, prompts[i:i + b],
                                    max_new_tokens=new_tokens, strategy=sampling.Temperature(1.0),
                                    row_ids=range(i, i + len(prompts[i:i + b])),
                                    constraint=constraint, dtype=jnp.dtype(cfg.model.dtype))
            texts += gen.texts
        reasons = Counter(numbers.parse_numbers(t)[1] or "kept" for t in texts)
        out["modes"][name] = {"pass_rate": reasons["kept"] / len(texts), "reasons": dict(reasons),
                              "seconds": time.perf_counter() - t0, "examples": texts[:5]}
    rows = [(k, f"{100 * v['pass_rate']:.1f}%", ", ".join(f"{r}: {c}" for r, c in
                                                         sorted(v["reasons"].items())))
            for k, v in out["modes"].items()]
    out["table"] = report.markdown_table(("mode", "filter pass rate", "outcomes"), rows)
    atomic_write_json(f"{cfg.out}/bench_numbers.json", out)
    print(out["table"])
    return out
