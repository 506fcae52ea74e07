"""The GPU check: one prepared run that says whether sjax is right and fast on an accelerator.

Run through `benchmarks/gpu_check.sh [--tiny] OUT_DIR` (system mode: the interpreter and
packages already installed). Each section runs in its own subprocess under its own time
limit, in priority order, within a total budget (8 minutes at full size); a failing, crashing
or timed-out section records its error and the rest still run. OUT_DIR/gpu_check.json is
rewritten after every section, so a killed run keeps what it measured.

Sections: devices; peak (bf16 matmul, the MFU denominator); parity (tiny random Qwen2 and
Llama forwards against transformers on the same device, fp32 and bf16); greedy (sjax greedy
decode against transformers `generate`); train_small (Qwen2.5-0.5B LoRA and full, bf16,
through `sjax.bench.train.bench_train`); train_7b (Qwen2.5-7B LoRA bf16); sample
(Qwen2.5-0.5B batch 64 and 256, bf16, through `sjax.bench.sample.bench_sample`); smoke
(`launch.sh --system smoke` on a random-weight model). Models are random-weight
(`model.init=random`): the checkpoints cannot travel to the GPU machine. `--tiny` runs every
section at toy sizes on any host (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H200_BF16 = 989e12  # dense bf16 FLOP/s, datasheet (H100/H200 SXM)

# name: (seconds allowed at full size, at --tiny); run in this order. The full-size limits
# add up to the 480 s budget, so every section gets its turn (a first guess for an H200:
# each includes a process start and its compiles; retune after the first run there)
SECTIONS = {"devices": (30, 60), "peak": (40, 60), "parity": (60, 120), "greedy": (40, 120),
            "train_small": (90, 240), "train_7b": (80, 180), "sample": (70, 180),
            "smoke": (70, 420)}
BUDGET_S = {False: 480, True: 1500}
PEAK_N = {False: 8192, True: 256}  # the peak section's square bf16 matmul
# the byte tokenizer of random models spells a row in ~4x the tokens of a BPE vocabulary
SMOKE = ["student.train.max_len=640"]


def sizes(ctx) -> dict:
    """Workloads: real architectures on a GPU, the tiny configs of `tiny_archs` with --tiny."""
    from sjax.config import ModelConfig

    if ctx["tiny"]:
        archs = tiny_archs(ctx["out"])
        small = ModelConfig(path=str(archs["qwen2"]), init="random")
        return {"small": small,
                "train_small": dict(train_batch=4, train_seq=32, train_steps=2),
                "big": ModelConfig(path=str(archs["llama"]), init="random"),
                "train_big": dict(train_batch=4, train_seq=32, train_steps=2),
                "sample": dict(batch_sizes=(2, 4), prompt_len=8, new_tokens=16, repeats=1),
                "smoke": [f"model.path={archs['llama']}", "model.init=random", *SMOKE]}
    return {"small": ModelConfig(name="qwen2.5-0.5b", init="random"),
            "train_small": dict(train_batch=16, train_seq=1024, train_steps=3),
            "big": ModelConfig(name="qwen2.5-7b", init="random"),
            "train_big": dict(train_batch=8, train_seq=1024, train_steps=3),
            "sample": dict(batch_sizes=(64, 256), prompt_len=128, new_tokens=64, repeats=2),
            "smoke": ["model.name=smollm2-135m", "model.init=random", *SMOKE]}


def tiny_archs(out: Path) -> dict[str, Path]:
    """Config folders of a 2-layer Qwen2 (qkv bias, tied) and Llama (llama3 rope, tied),
    shrunk from the shipped Qwen2.5-0.5B and Llama-3.2-1B configs."""
    from sjax.weights.random_init import arch_dir

    small = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "vocab_size": 512, "max_position_embeddings": 1024, "bos_token_id": None,
             "eos_token_id": None}  # no stop token: every decode runs its full length
    folders = {}
    for family, name in (("qwen2", "qwen2.5-0.5b"), ("llama", "llama-3.2-1b")):
        cfg = json.loads((arch_dir(name) / "config.json").read_text()) | small
        folders[family] = out / "archs" / f"tiny-{family}"
        folders[family].mkdir(parents=True, exist_ok=True)
        (folders[family] / "config.json").write_text(json.dumps(cfg, indent=1))
    return folders


# ----------------------------------------------------------------------------- sections


def section_devices(ctx) -> dict:
    import importlib.metadata as md

    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    versions = {}
    for pkg in ("jax", "jaxlib", "optax", "orbax-checkpoint", "transformers", "torch",
                "peft", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"backend": jax.default_backend(), "count": jax.device_count(),
            "kind": dev.device_kind, "devices": [str(d) for d in jax.devices()],
            "memory_gb": stats.get("bytes_limit", 0) / 1e9 or None, "versions": versions,
            "python": sys.executable}


def section_peak(ctx) -> dict:
    """Best of 3 measurements of a jitted n^3 matmul (bf16 in, fp32 accumulate)."""
    import jax.numpy as jnp

    from sjax import perf

    n = PEAK_N[ctx["tiny"]]
    runs = [perf.matmul_peak(n=n, dtype=jnp.bfloat16) for _ in range(3)]
    return {"n": n, "bf16_tflop_s": max(runs) / 1e12, "runs_tflop_s": [r / 1e12 for r in runs],
            "datasheet_tflop_s": H200_BF16 / 1e12}


def _twins(family: str, out: Path, seed: int = 0):
    """(transformers model on the device, sjax arch, sjax params): a tiny random model with
    weights large enough (std 0.2) that a wrong op shows in the logits."""
    import jax
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sjax.weights import hf

    folder = tiny_archs(out)[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)),
                                             dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else p.normal_(1.0, 0.1)
    arch = hf.arch_from_hf_config(json.loads((folder / "config.json").read_text()))
    params = hf.params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, arch,
                               str(folder))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.eval().to(device), arch, jax.tree.map(jax.numpy.asarray, params)


def section_parity(ctx) -> dict:
    """max |logit diff| sjax vs transformers: fp32 at full matmul precision on both sides
    (no TF32), and bf16 (bf16 weights and compute on both sides); each bf16 result is also
    compared with the fp32 reference, the error bf16 itself brings."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from sjax.models.transformer import forward

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for family in ("qwen2", "llama"):
        model, arch, params = _twins(family, ctx["out"])
        ids = np.random.default_rng(0).integers(0, arch.vocab_size, (2, 48))
        tids = torch.tensor(ids, device=next(model.parameters()).device)
        with torch.no_grad():
            ref32 = model(tids).logits.float().cpu().numpy()
            ref16 = model.to(torch.bfloat16)(tids).logits.float().cpu().numpy()
        with jax.default_matmul_precision("highest"):
            ours32 = np.asarray(forward(params, jnp.asarray(ids), arch=arch)[0])
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        ours16 = np.asarray(forward(p16, jnp.asarray(ids), arch=arch, dtype=jnp.bfloat16)[0],
                            np.float32)
        out[family] = {"fp32_max_abs_diff": float(np.abs(ours32 - ref32).max()),
                       "bf16_max_abs_diff": float(np.abs(ours16 - ref16).max()),
                       "bf16_sjax_vs_fp32": float(np.abs(ours16 - ref32).max()),
                       "bf16_torch_vs_fp32": float(np.abs(ref16 - ref32).max()),
                       "logit_max_abs": float(np.abs(ref32).max())}
    out["targets"] = {"fp32": 1e-4, "bf16": 1e-2}
    return out


def section_greedy(ctx) -> dict:
    """sjax greedy tokens equal to transformers generate (fp32, full precision), 24 new
    tokens from 4 prompts of different lengths (left padding on the sjax side)."""
    import jax
    import numpy as np
    import torch

    from sjax import sampling
    from sjax.weights.random_init import byte_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    rng = np.random.default_rng(1)
    for family in ("qwen2", "llama"):
        model, arch, params = _twins(family, ctx["out"], seed=1)
        prompts = [rng.integers(0, 256, n).tolist() for n in (5, 12, 12, 20)]
        with jax.default_matmul_precision("highest"):
            gen = sampling.generate(params, arch, byte_tokenizer(), prompts, max_new_tokens=24,
                                    strategy=sampling.Greedy(), stop_ids=[])
        theirs = []
        with torch.no_grad():
            for p in prompts:  # one at a time: no padding on the reference side
                ids = torch.tensor([p], device=next(model.parameters()).device)
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=24, pad_token_id=0)
                theirs.append(seq[0, len(p):].tolist())
        same = [a == b for a, b in zip(gen.tokens, theirs)]
        out[family] = {"equal": all(same), "rows_equal": same,
                       "first_mismatch": next(([i, j] for i, (a, b) in
                                               enumerate(zip(gen.tokens, theirs))
                                               for j, (x, y) in enumerate(zip(a, b)) if x != y),
                                              None)}
    out["equal"] = all(v["equal"] for v in out.values())
    return out


def _train(ctx, model_key: str, runs: tuple[str, ...], torch: bool) -> dict:
    import dataclasses

    from sjax.bench.train import bench_train
    from sjax.config import BenchConfig

    s = sizes(ctx)
    cfg = BenchConfig(model=s[model_key], train_runs=runs, torch=torch,
                      out=str(ctx["out"] / f"bench_train_{model_key}"), **s[f"train_{model_key}"])
    res = bench_train(cfg)
    peak = ctx.get("peak_bf16")  # FLOP/s measured by the peak section, if it ran
    rows = []
    for r in res["results"]:
        flop_s = r["flops"] / r["step_s"]
        rows.append({k: r.get(k) for k in ("impl", "mode", "dtype", "remat", "step_s",
                                           "tokens_per_s", "mfu", "compile_s", "peak_rss_gb",
                                           "peak_device_gb", "trainable_params")}
                    | {"loss_step1": (r.get("losses") or [None])[0],
                       "tflop_s": flop_s / 1e12, "mfu_vs_989": flop_s / H200_BF16,
                       "mfu_vs_measured_peak": flop_s / peak if peak else None})
    return {"model": dataclasses.asdict(cfg.model), "batch": cfg.train_batch,
            "seq": cfg.train_seq, "runs": rows, "table": res.get("table")}


def section_train_small(ctx) -> dict:
    return _train(ctx, "small", ("lora:bfloat16:none", "full:bfloat16:none"), torch=True)


def section_train_7b(ctx) -> dict:
    # remat of the matmul outputs only: batch 8 x 1024 keeps ~30 GB of activations, and no
    # second forward is spent; torch+peft at 7B would take minutes of the budget (the 0.5B
    # section carries that comparison)
    return _train(ctx, "big", ("lora:bfloat16:dots",), torch=False)


def section_sample(ctx) -> dict:
    import dataclasses

    from sjax.bench.sample import bench_sample
    from sjax.config import BenchConfig

    s = sizes(ctx)
    model = dataclasses.replace(s["small"], dtype="bfloat16", param_dtype="bfloat16")
    cfg = BenchConfig(model=model, torch=True, torch_dtypes=("bfloat16",),
                      out=str(ctx["out"] / "bench_sample"), **s["sample"])
    res = bench_sample(cfg)
    rows = res["results"]
    for r in rows:
        base = next((x for x in rows if x["impl"] == "transformers"
                     and x["batch"] == r["batch"]), None)
        if r["impl"] == "sjax" and base:
            r["decode_vs_transformers"] = r["decode_tok_s"] / base["decode_tok_s"]
    return {"model": dataclasses.asdict(model), "results": rows, "table": res.get("table")}


def section_smoke(ctx) -> dict:
    """`launch.sh --system smoke` on a random-weight model: the pipeline end to end."""
    cmd = [str(ROOT / "launch.sh"), "--system", "smoke", *sizes(ctx)["smoke"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHON": sys.executable})
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: " +
                           " | ".join((proc.stderr.strip().splitlines() or ["?"])[-3:]))
    return {"ok": "smoke OK" in lines, "command": " ".join(cmd),
            "lines": [x for x in lines if x.startswith(("devices", "pipeline", "train step"))]}


# ----------------------------------------------------------------------------- driver


def run_section(name: str, out: Path, tiny: bool) -> None:
    """Child process: run one section, write out/sections/NAME.json (result or error)."""
    ctx = {"out": out, "tiny": tiny}
    peak_file = out / "sections" / "peak.json"
    if peak_file.is_file():
        peak = json.loads(peak_file.read_text()).get("result") or {}
        ctx["peak_bf16"] = peak.get("bf16_tflop_s", 0) * 1e12 or None
    t0 = time.perf_counter()
    try:
        rec = {"status": "ok", "result": globals()[f"section_{name}"](ctx)}
    except Exception as e:  # recorded, and the driver goes on with the next section
        rec = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
    rec["seconds"] = time.perf_counter() - t0
    tmp = out / "sections" / f"{name}.json.partial"
    tmp.write_text(json.dumps(rec, indent=1, default=str))
    tmp.replace(out / "sections" / f"{name}.json")


def drive(out: Path, tiny: bool, only: list[str], budget: float) -> dict:
    (out / "sections").mkdir(parents=True, exist_ok=True)
    report = {"tiny": tiny, "budget_s": budget, "sections": {}}
    t_end = time.perf_counter() + budget
    for name, limits in SECTIONS.items():
        if only and name not in only:
            continue
        left = t_end - time.perf_counter()
        limit = min(limits[tiny], left)
        (out / "sections" / f"{name}.json").unlink(missing_ok=True)
        if limit < 20:
            rec = {"status": "skipped", "error": f"total budget of {budget:.0f}s spent"}
        else:
            print(f"gpu_check: {name} (limit {limit:.0f}s)", flush=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, str(out), "--section", name] + ["--tiny"] * tiny
            # its own process group, so a timeout also ends the workers it started
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                text, _ = proc.communicate(timeout=limit)
                status = None if proc.returncode == 0 else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                text, _ = proc.communicate()
                status = f"timeout after {limit:.0f}s"
            tail = text.strip().splitlines()[-15:]
            f = out / "sections" / f"{name}.json"
            if f.is_file():
                rec = json.loads(f.read_text())
            else:  # killed, crashed or timed out before writing its result
                rec = {"status": "error", "error": status or "no result written",
                       "seconds": time.perf_counter() - t0}
            rec["output_tail"] = tail
        report["sections"][name] = rec
        summary = rec.get("error") or json.dumps(rec.get("result"), default=str)[:300]
        print(f"gpu_check: {name}: {rec['status']} ({rec.get('seconds', 0):.0f}s) {summary}",
              flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--tiny", action="store_true", help="toy sizes: proves every section runs")
    p.add_argument("--only", default="", help="comma-separated sections (default: all)")
    p.add_argument("--budget", type=float, default=0, help="total seconds (default 480)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: the child process
    a = p.parse_args(argv)
    out = a.out.resolve()
    if a.section:
        run_section(a.section, out, a.tiny)
        return 0
    only = [s for s in a.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))} "
                f"(sections: {', '.join(SECTIONS)})")
    report = drive(out, a.tiny, only, a.budget or BUDGET_S[a.tiny])
    bad = [n for n, r in report["sections"].items() if r["status"] != "ok"]
    print(f"gpu_check: wrote {out / 'gpu_check.json'}; "
          + (f"not ok: {', '.join(bad)}" if bad else "all sections ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
