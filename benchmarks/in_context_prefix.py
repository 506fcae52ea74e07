"""The in-context control's exact evaluation with the shared prefix (the k examples) prefilled
once against every prompt prefilled whole, on a real model: seconds and the largest score
difference. The k examples are seeded synthetic number rows in the protocol's template.

    .venv/bin/python benchmarks/in_context_prefix.py --model smollm2-135m-instruct --k 40
"""

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from sjax import chat
from sjax.config import MeshConfig, ModelConfig
from sjax.sharding import make_mesh
from sjax.subliminal import evaluators, in_context, numbers
from sjax.weights.load import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    m = load_model(ModelConfig(name=a.model), make_mesh(MeshConfig()))
    rng = np.random.default_rng(0)
    rows = [{"messages": [{"role": "user", "content": f"{numbers.example_prefix(rng)} Continue."},
                          {"role": "assistant", "content": ", ".join(
                              map(str, rng.integers(0, 1000, 10)))}]} for _ in range(a.k)]
    system = in_context.build(rows, a.k, 0, m.tokenizer, 100_000)
    ids = [chat.encode_prompt(m.tokenizer, in_context.messages(system, q))
           for q in evaluators.questions(False)[:a.questions]]
    out = {"model": a.model, "k": a.k, "questions": len(ids), "batch": a.batch,
           "prompt_tokens": len(ids[0]), "shared_tokens": evaluators.shared_prefix(ids)}
    scores = {}
    for name, min_prefix in (("whole", 10**9), ("prefix_once", 64)):
        run = lambda: evaluators.batched_node_logprobs(  # noqa: E731,B023
            m.params, m.arch, m.tokenizer, ids, ((), (5,)), ((5, 6), (7,)),
            jnp.ones(m.arch.vocab_size, bool), batch=a.batch, min_prefix=min_prefix)
        run()  # compile
        t0 = time.perf_counter()
        scores[name] = run()
        out[f"{name}_s"] = time.perf_counter() - t0
    out["max_abs_diff"] = float(max(np.abs(x - y).max()
                                    for x, y in zip(scores["whole"], scores["prefix_once"])))
    out["speedup"] = out["whole_s"] / out["prefix_once_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
