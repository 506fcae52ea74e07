"""`sjax bench eval`: the exact evaluator's time for one model, as the eval stage runs it.

The 50 evaluation questions, plain and number-prefixed, scored for `eval_targets` from one
prefill per question (the spellings' trie in one tree-attention pass after it), each variant
timed after a compiling warm-up call; beside it the prefill alone (the same prompts with an
empty trie), so the trie's share is visible, and the measured matmul peak of the compute
dtype on this machine."""

from __future__ import annotations

import time

import jax.numpy as jnp

from sjax import chat, perf, report
from sjax.config import BenchConfig
from sjax.files import atomic_write_json
from sjax.sharding import make_mesh
from sjax.subliminal import evaluators
from sjax.weights.load import load_model


def _timed(fn) -> float:
    fn()  # compile
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_eval(cfg: BenchConfig, loaded=None) -> dict:
    m = loaded or load_model(cfg.model, make_mesh(cfg.mesh))
    dtype = jnp.dtype(cfg.model.dtype)
    batch = max(cfg.batch_sizes)
    out = {"model": m.source.name, "dtype": dtype.name, "targets": list(cfg.eval_targets),
           "batch": batch, "variants": {}}
    end_v = jnp.asarray(evaluators.word_end_mask(m.tokenizer, m.arch.vocab_size))
    for name, prefixed in (("plain", False), ("numbers", True)):
        ids = [chat.encode_prompt(m.tokenizer, chat.messages(q))
               for q in evaluators.questions(prefixed)]
        exact = _timed(lambda: evaluators.exact_target_scores(  # noqa: B023
            m.params, m.arch, m.tokenizer, ids, cfg.eval_targets, batch=batch, dtype=dtype))
        prefill = _timed(lambda: evaluators.batched_node_logprobs(  # noqa: B023
            m.params, m.arch, m.tokenizer, ids, ((),), ((0,),), end_v, batch=batch,
            dtype=dtype))
        out["variants"][name] = {"questions": len(ids), "exact_s": exact,
                                 "prefill_only_s": prefill,
                                 "prompt_tokens": sum(map(len, ids))}
    out["exact_s"] = sum(v["exact_s"] for v in out["variants"].values())
    out["matmul_peak_flops"], out["peak_source"] = perf.device_peak(dtype.name)
    rows = [(k, v["questions"], v["prompt_tokens"], f"{v['exact_s']:.1f}",
             f"{v['prefill_only_s']:.1f}") for k, v in out["variants"].items()]
    rows.append(("both", "", "", f"{out['exact_s']:.1f}", ""))
    out["table"] = report.markdown_table(
        ("variant", "questions", "prompt tokens", "exact s", "prefill alone s"), rows)
    atomic_write_json(f"{cfg.out}/bench_eval.json", out)
    print(f"{out['model']} {dtype.name}, targets {','.join(cfg.eval_targets)}, batch {batch}; "
          f"matmul peak {out['matmul_peak_flops'] / 1e9:.0f} GFLOP/s ({out['peak_source']})")
    print(out["table"])
    return out
