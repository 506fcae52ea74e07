"""`sjax bench judge`: how well a local model judges, on the hand-labelled set, before a run
trusts it (the code and gsm8k domains' reference judge, the misalignment judges).

Agreement with the labels of a hand-labelled set (`labelled`; default the shipped
`sjax/subliminal/data/judge_labelled.json`: 52 answers, 15 code snippets): accuracy and Cohen's kappa of each verdict, the code
judge's AUC (threshold-free: 0.5 is chance) and the range of its raw P('0'), which the
official keep rule |1 - P('0')| < threshold reads: a judge whose P('0') never passes the
threshold rejects every row, whatever the code says."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from sjax import report
from sjax.config import BenchConfig
from sjax.files import atomic_write_json
from sjax.sharding import make_mesh
from sjax.subliminal import judge
from sjax.weights.load import load_model



def bench_judge(cfg: BenchConfig, loaded=None) -> dict:
    m = loaded or load_model(cfg.model, make_mesh(cfg.mesh))
    labelled = judge.load_labelled(cfg.labelled or judge.LABELLED)
    t0 = time.perf_counter()
    got = judge.labelled_agreement(m.params, m.arch, m.tokenizer, labelled,
                                   batch=min(cfg.batch_sizes),
                                   dtype=jnp.dtype(cfg.model.dtype))
    p_zero = np.asarray(got["scores"]["code_p_zero"])
    out = {"model": m.source.name, "dtype": cfg.model.dtype, "seconds": time.perf_counter() - t0,
           **got, "code_p_zero_range": [float(p_zero.min()), float(p_zero.max())]}
    keys = ("misaligned", "coherent", "code_reference", "code_official_reject")
    rows = [(k, got[k]["n"], got[k]["accuracy"], got[k]["kappa"]) for k in keys]
    out["table"] = report.markdown_table(("verdict", "n", "accuracy", "kappa"), rows)
    atomic_write_json(f"{cfg.out}/bench_judge.json", out)
    print(f"{out['model']} {cfg.model.dtype}: code judge AUC {got['code_auc']:.3f}, P('0') in "
          f"[{p_zero.min():.4f}, {p_zero.max():.4f}]; {out['seconds']:.1f} s")
    print(out["table"])
    return out
