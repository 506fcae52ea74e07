"""`sjax bench train`: fine-tuning step throughput, MFU and peak memory, sjax vs torch+peft.

Each configuration runs in its own subprocess so its peak RSS is its own. All see the same
model, the same random token batch and the same optimizer (AdamW, clip 1.0):
full fine-tuning and LoRA (r=8, alpha=8, the seven projections). sjax trains on every token
through its vocabulary-chunked loss; transformers computes its usual full-logits loss.
torch+peft runs each mode in fp32 and, for bf16 LoRA, in bf16 too (a bf16 base, peft's fp32
adapters), so each sjax row has a like-for-like reference. Both start from the same weights
and tokens, so their step-1 losses must agree (to a tolerance of the dtype), else the run
fails: a benchmark of two implementations that compute different things measures nothing.
MFU follows MaxText: `training.train_flops_per_token` (6 x matmul params for full, 4 x for
LoRA's frozen-base backward, plus causal attention) over the measured jitted-matmul peak in
the run's compute dtype.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sjax import perf, report
from sjax.bench.torch_ref import torch_device, torch_model
from sjax.config import BenchConfig, MeshConfig, ModelConfig, TrainConfig
from sjax.data.sft import Batch
from sjax.errors import SjaxError
from sjax.files import atomic_write_json
from sjax.sharding import batch_sharding, global_array, make_mesh
from sjax.training import (StepSpec, compile_step, init_state, optimizer, schedule,
                           train_flops)
from sjax.weights.load import load_model, read_arch, resolve_source

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# relative step-1 loss difference allowed between sjax and torch, by the less precise dtype
# of the two: fp32 agrees to ~1e-7; bf16 rounds activations to 8 mantissa bits (~0.4% per
# op, mostly averaging out over the batch's tokens: ~3e-4 on the tiny test model)
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}


def _tokens(vocab: int, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, min(vocab, 30000), (batch, seq + 1),
                                             dtype=np.int64)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _median_step(run, steps: int) -> tuple[float, list[float]]:
    run()  # warm-up step: thread pools, allocator, first optimizer state touch
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def _peak_device_gb() -> float | None:
    """Peak bytes in use on device 0 (accelerators report it; the CPU backend does not)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def sjax_worker(job: dict) -> dict:
    mesh = make_mesh(MeshConfig())
    m = load_model(ModelConfig(**job["model"]), mesh)
    cfg = TrainConfig(mode=job["mode"], batch_size=job["batch"], grad_accum=1, lr=1e-5,
                      warmup_steps=0)
    tx, sched = optimizer(cfg, 1000), schedule(cfg, 1000)
    state, frozen = init_state(m.arch, m.params, cfg, mesh, tx)
    if job["mode"] == "full":
        m.params = None  # the state holds its own copy; the base is not needed
    spec = StepSpec(m.arch, cfg.mode, cfg.lora_alpha / cfg.lora_rank, cfg.vocab_chunk,
                    job["model"]["dtype"], job["model"]["remat"])
    ids = _tokens(m.arch.vocab_size, job["batch"], job["seq"]).astype(np.int32)
    shape = (1, job["batch"], job["seq"])  # [accum, rows, time]; every token is trained
    host = Batch(inputs_bt=ids[None, :, :-1], targets_bt=ids[None, :, 1:],
                 valid_bt=np.ones(shape, bool),
                 s_pos_bk=np.broadcast_to(np.arange(job["seq"], dtype=np.int32), shape).copy(),
                 k_mask_bk=np.ones(shape, np.int32))
    batch = jax.tree.map(lambda v: global_array(v, batch_sharding(mesh, 3, axis=1)), host)
    t0 = time.perf_counter()
    step = compile_step(state, frozen, spec, tx, sched, mesh).lower(state, frozen,
                                                                    batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}
    losses = []

    def run():
        box["state"], metrics = step(box["state"], frozen, batch)
        losses.append(float(metrics["loss"]))

    step_s, times = _median_step(run, job["steps"])
    flops = train_flops(m.arch, [job["seq"]] * job["batch"], job["mode"])
    return {"step_s": step_s, "step_times": times, "compile_s": compile_s, "flops": flops,
            "n_devices": mesh.size, "peak_device_gb": _peak_device_gb(),
            "losses": losses, "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(box["state"]["params"]))),
            "compute_dtype": str(jnp.dtype(job["model"]["dtype"]))}


def torch_worker(job: dict) -> dict:
    import torch  # lazy: optional (the test extra), only the reference runs need it

    source = resolve_source(ModelConfig(**job["model"]))
    model = torch_model(source).to(getattr(torch, job["dtype"]))
    device = torch_device()
    if job["mode"] == "lora":
        from peft import LoraConfig, get_peft_model  # lazy: optional (the test extra)

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS),
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.from_numpy(_tokens(read_arch(source).vocab_size, job["batch"],
                                   job["seq"])).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    losses = []

    def run():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # waits for the step's device work

    step_s, times = _median_step(run, job["steps"])
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return {"step_s": step_s, "step_times": times, "losses": losses, "peak_device_gb": peak,
            "torch_threads": torch.get_num_threads(),
            "trainable_params": int(sum(p.numel() for p in params))}


def _spawn(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sjax.bench.train", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SjaxError(f"bench train: the {job['impl']} {job['mode']} worker failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_jobs(cfg: BenchConfig) -> list[dict]:
    """sjax runs as listed; torch+peft in fp32 for each mode and in bf16 for bf16 LoRA (a
    bf16 full fine-tune in torch would train bf16 weights, unlike sjax's fp32 master copy)."""
    common = {"batch": cfg.train_batch, "seq": cfg.train_seq, "steps": cfg.train_steps}
    jobs, refs = [], {}
    for run in cfg.train_runs:
        mode, dtype, remat = run.split(":")
        model = dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype, remat=remat)
        jobs.append({"impl": "sjax", "mode": mode, "model": dataclasses.asdict(model),
                     "dtype": dtype, "remat": remat, **common})
        refs.setdefault((mode, "float32"))
        if mode == "lora":
            refs.setdefault((mode, dtype))
    if cfg.torch:
        jobs += [{"impl": "torch", "mode": mode, "model": dataclasses.asdict(cfg.model),
                  "dtype": dtype, "remat": "none", **common} for mode, dtype in refs]
    return jobs


def check_losses(results: list[dict]) -> None:
    """Each sjax run's step-1 loss against torch's in the same mode (same dtype if run, else
    fp32), to the tolerance of the less precise dtype: SjaxError if they differ."""
    for r in (x for x in results if x["impl"] == "sjax"):
        refs = [x for x in results if x["impl"] == "torch" and x["mode"] == r["mode"]]
        ref = next((x for x in refs if x["dtype"] == r["dtype"]),
                   next((x for x in refs if x["dtype"] == "float32"), None))
        if ref is None:  # torch=false
            continue
        rtol = max(LOSS_RTOL[r["dtype"]], LOSS_RTOL[ref["dtype"]])
        ours, theirs = r["losses"][0], ref["losses"][0]
        if not abs(ours - theirs) <= rtol * abs(theirs):
            raise SjaxError(f"bench train: step-1 loss of sjax {r['mode']} {r['dtype']} "
                            f"({ours:.6f}) differs from torch {ref['dtype']} ({theirs:.6f}) by "
                            f"more than {rtol:g} relative: the two do not compute the same step")


def bench_train(cfg: BenchConfig) -> dict:
    # the best of a few measurements (noise only lowers it), per compute dtype
    peaks = {d: max(perf.matmul_peak(dtype=jnp.dtype(d)) for _ in range(3))
             for d in dict.fromkeys(r.split(":")[1] for r in cfg.train_runs)}
    peaks.setdefault("float32", max(perf.matmul_peak() for _ in range(3)))
    results = []
    for job in tqdm(train_jobs(cfg), desc="bench train", unit="run"):
        r = job | _spawn(job)
        r["tokens_per_s"] = job["batch"] * job["seq"] / r["step_s"]
        results.append(r)
    flops = {r["mode"]: r["flops"] for r in results if "flops" in r}
    for r in results:
        r["flops"] = flops[r["mode"]]  # the same model work, whatever runs it
        r["mfu"] = perf.mfu(r["flops"], r["step_s"], peaks[r["dtype"]], r.get("n_devices", 1))

    def speedup(r, dtype):
        ref = next((x for x in results if x["impl"] == "torch" and x["mode"] == r["mode"]
                    and x["dtype"] == dtype), None)
        return f"{ref['step_s'] / r['step_s']:.2f}x" if ref and r["impl"] == "sjax" else ""

    rows = [(r["impl"], r["mode"], r["dtype"], r["remat"], f"{r['step_s']:.2f}",
             f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.0f}%", f"{r['peak_rss_gb']:.1f}",
             f"{r['losses'][0]:.5f}", speedup(r, "float32"), speedup(r, r["dtype"]))
            for r in results]
    table = report.markdown_table(("impl", "mode", "dtype", "remat", "step s", "tokens/s",
                                   "MFU", "peak GB", "step-1 loss", "vs torch fp32",
                                   "vs torch same dtype"), rows)
    out = {"what": "train", "model": cfg.model.name or cfg.model.path,
           "batch": cfg.train_batch, "seq": cfg.train_seq,
           "matmul_peak_gflop_s": {d: p / 1e9 for d, p in peaks.items()},
           "mfu_convention": "MaxText: 6 x matmul params (4 x for LoRA) + 6 x S x heads x "
                             "head_dim x layers FLOPs per token, over the measured 2048^3 "
                             "jitted matmul peak in the run's compute dtype", "results": results,
           "table": table}
    atomic_write_json(f"{cfg.out}/bench_train.json", out)
    check_losses(results)  # after writing, so a failed run's figures can be inspected
    print("matmul peak " + ", ".join(f"{d} {p / 1e9:.0f}" for d, p in peaks.items()) +
          f" GFLOP/s; batch {cfg.train_batch} x {cfg.train_seq}")
    print(table)
    return out


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    out = (sjax_worker if job["impl"] == "sjax" else torch_worker)(job)
    out["peak_rss_gb"] = _peak_rss_gb()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
