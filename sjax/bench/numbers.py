"""`sjax bench numbers`: how often free vs constrained number continuations pass the filter."""

from __future__ import annotations

import time
from collections import Counter

import jax.numpy as jnp

from sjax import chat, report, sampling
from sjax.config import BenchConfig
from sjax.constrained import number_list_constraint
from sjax.subliminal import numbers
from sjax.files import atomic_write_json
from sjax.sharding import make_mesh
from sjax.weights.load import load_model


def bench_numbers(cfg: BenchConfig, n_prompts: int = 128, loaded=None) -> dict:
    """Filter pass rate of free vs constrained number continuations (temperature 1)."""
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
