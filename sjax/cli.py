"""`sjax SUBCOMMAND [CONFIG] [key=value ...]`: every subcommand reads a preset + overrides.

Bad input (an unknown key, a wrong type, a missing file) ends with one `sjax: error: ...`
line and exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjax import chat, config, distributed, perf, sampling, sharding
from sjax import lora as lora_lib
from sjax.bench import evaluate as bench_eval
from sjax.bench import judge as bench_judge
from sjax.bench import numbers as bench_numbers
from sjax.bench import sample as bench_sample
from sjax.bench import train as bench_train
from sjax.data import sft
from sjax.errors import SjaxError
from sjax.files import atomic_write_json, sha256_file
from sjax.mnist import experiment as mnist
from sjax.models.transformer import param_logical_axes, param_shapes
from sjax.subliminal import experiment, plan, screen
from sjax.subliminal.prompts import questions_file
from sjax.training import fit
from sjax.weights.load import export_hf, load_model, read_arch, resolve_source

DEFAULT_PRESETS = {"chat": "chat", "info": "chat", "export": "chat", "mnist": "mnist",
                   "train": "sft", "run": "owl:quickstart", "screen": "screen"}


def _config(args, default_preset):
    preset = args.config or default_preset
    overrides = list(args.overrides)
    if preset and "=" in preset:  # no preset given, first word is an override
        overrides.insert(0, preset)
        preset = default_preset
    return config.apply_overrides(config.load_preset(preset), overrides)


def _load(cfg):
    mesh = sharding.make_mesh(cfg.mesh)
    return mesh, load_model(cfg.model, mesh)


def cmd_run(args) -> int:
    """The subliminal-learning pipeline: teachers, numbers, filter, students, eval, report."""
    cfg = _config(args, DEFAULT_PRESETS["run"])
    arch = read_arch(resolve_source(cfg.model))
    student_arch = read_arch(resolve_source(cfg.student_model()))
    n_dev = args.devices or jax.device_count()
    shape = dict(zip(("data", "fsdp", "tensor"), sharding.mesh_shape(cfg.mesh, n_dev)))
    device_bytes, where = plan.device_memory()
    judge_arch = (read_arch(resolve_source(cfg.judge_model()))
                  if "misalignment" in cfg.eval.evaluators else None)
    p = plan.make_plan(cfg, arch, student_arch, shape,
                       None if args.devices else device_bytes, judge_arch)
    name = cfg.model.name or cfg.model.path
    if args.dry_run:
        print(config.to_json(cfg))
        print(plan.render_plan(p))
        plan.check_fits(p, name, where)
        print("config OK")
        return 0
    plan.check_fits(p, name, where)
    t0 = time.perf_counter()
    ws = experiment.run(cfg, force=tuple(args.force or ()), reuse=args.reuse)
    print(f"run folder {ws.root} ({time.perf_counter() - t0:.0f}s this invocation, "
          f"{ws.model_loads} model loads)", file=sys.stderr)
    return 0


def cmd_smoke(args) -> int:
    """One short check of this host: devices, a tiny pipeline's timings, train-step MFU."""
    dev = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
          f"{jax.process_count()} process(es)")
    dtype = "float32" if dev.platform == "cpu" else "bfloat16"
    extra = ([args.config] if args.config else []) + list(args.overrides)
    cfg = config.apply_overrides(config.load_preset("owl:smoke"),
                                 [f"model.dtype={dtype}"] + extra)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ws = experiment.run(dataclasses.replace(cfg, out_dir=tmp))
        stages = {k: v["seconds"] for k, v in ws.manifest["stages"].items()}
    print(f"pipeline owl_smoke: {time.perf_counter() - t0:.1f}s (" +
          ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()) + ")")
    peak, source = perf.device_peak(dtype)
    for mode in ("full", "lora"):
        job = {"impl": "sjax", "mode": mode, "model": dataclasses.asdict(cfg.model),
               "batch": 8 * jax.device_count(), "seq": 128, "steps": 3}
        r = bench_train.sjax_worker(job)  # random tokens, no padding: every token is real
        mfu = perf.mfu(r["flops"], r["step_s"], peak, jax.device_count())
        print(f"train step {mode} ({cfg.model.name}, {dtype}, batch {job['batch']} x 128): "
              f"{r['step_s'] * 1e3:.0f} ms, {job['batch'] * 128 / r['step_s']:.0f} tokens/s, "
              f"MFU {100 * mfu:.1f}% of {source}")
        if not all(np.isfinite(r["losses"])):
            raise SjaxError(f"smoke: non-finite training loss in {mode} mode: {r['losses']}")
    print("smoke OK")
    return 0


def cmd_chat(args) -> int:
    """Answer one prompt with a model (greedy unless temperature > 0)."""
    cfg = _config(args, DEFAULT_PRESETS["chat"])
    _, m = _load(cfg)
    print(f"loaded {m.source.name} ({m.arch.arch}, {m.arch.n_params / 1e6:.0f}M params) "
          f"in {m.load_seconds:.1f}s", file=sys.stderr)
    prompt = chat.encode_prompt(m.tokenizer, chat.messages(cfg.prompt, cfg.system))
    t0 = time.perf_counter()
    gen = sampling.generate(m.params, m.arch, m.tokenizer, [prompt],
                            max_new_tokens=cfg.max_new_tokens,
                            strategy=sampling.strategy_for(cfg.temperature), seed=cfg.seed,
                            dtype=jnp.dtype(cfg.model.dtype))
    dt = time.perf_counter() - t0
    print(f"user: {cfg.prompt}")
    print(f"assistant: {gen.texts[0].strip()}")
    print(f"({len(gen.tokens[0])} tokens in {dt:.1f}s including compile)", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    """Print the resolved config, the architecture and the parameter shardings."""
    cfg = _config(args, DEFAULT_PRESETS["info"])
    mesh = sharding.make_mesh(cfg.mesh)
    print(config.to_json(cfg))
    arch = read_arch(resolve_source(cfg.model))
    print(json.dumps(arch.__dict__, indent=2, default=str))
    print(f"mesh {dict(mesh.shape)}")
    for name, spec in sharding.spec_table(param_logical_axes(arch), param_shapes(arch),
                                          mesh).items():
        print(f"  {name:24s} {spec}")
    return 0


def cmd_export(args) -> int:
    """Export the configured model as a Hugging Face folder."""
    cfg = _config(args, DEFAULT_PRESETS["export"])
    _, m = _load(cfg)
    export_hf(Path(args.out), m.arch, m.params, m.tokenizer)
    print(f"exported {m.source.name} to {args.out}")
    return 0


def cmd_mnist(args) -> int:
    """The MNIST auxiliary-logit experiment: table, results.json, report.md, PNG."""
    mnist.run(_config(args, DEFAULT_PRESETS["mnist"]))
    return 0


def cmd_train(args) -> int:
    """Fine-tune (LoRA or full) on a chat-messages JSONL file; resumes from out_dir."""
    cfg = _config(args, DEFAULT_PRESETS["train"])
    if not cfg.data:
        raise SjaxError("data: set data=PATH to a chat-messages JSONL file")
    mesh, m = _load(cfg)
    data = sft.load_jsonl(Path(cfg.data), m.tokenizer, cfg.train.max_len, cfg.train.too_long,
                          cfg.teacher_system if cfg.train.loss == "distill" else None,
                          cfg.train.distill_on)
    print(f"{len(data.ids)} rows ({data.n_truncated} truncated, {data.n_rejected} rejected at "
          f"max_len={cfg.train.max_len})", file=sys.stderr)
    out = fit(m.arch, m.params, data, cfg.train, mesh, Path(cfg.out_dir),
              pad_id=chat.pad_id(m.tokenizer),
              max_steps=cfg.max_steps, dtype=cfg.model.dtype, remat=cfg.model.remat,
              data_sha256=sha256_file(Path(cfg.data)), log=lambda s: print(s, file=sys.stderr))
    hist = out["history"]
    summary = {"steps": out["total_steps"], "rows": len(data.ids),
               "truncated": data.n_truncated, "rejected": data.n_rejected,
               "final_loss": hist[-1]["loss"] if hist else None,
               "tokens_per_s": float(np.median([h["tokens_per_s"] for h in hist[1:] or hist]))
               if hist else None,
               "mfu": float(np.median([h["mfu"] for h in hist[1:] or hist])) if hist else None,
               "peak_source": out["peak_source"]}
    atomic_write_json(Path(cfg.out_dir) / "summary.json", summary)
    if cfg.export:
        params = out["state"]["params"]
        if cfg.train.mode == "lora":
            params = lora_lib.merge(out["frozen"]["base"], params,
                                    cfg.train.lora_alpha / cfg.train.lora_rank)
        export_hf(Path(cfg.out_dir) / "export", m.arch, params, m.tokenizer)
    print(json.dumps(summary))
    return 0


def cmd_screen(args) -> int:
    """Screen candidate targets before training (P(target) lift, KL, entangled numbers)."""
    cfg = _config(args, DEFAULT_PRESETS["screen"])
    if not isinstance(cfg, config.ScreenConfig):
        raise SjaxError(f"screen: the config is a {type(cfg).__name__}, not a ScreenConfig "
                        f"(use the screen preset or a .py path returning one)")
    if cfg.questions:  # bad input fails before the model loads
        questions_file(cfg.questions)
    mesh, m = _load(cfg)
    print(f"loaded {m.source.name} ({m.arch.arch}, {m.arch.n_params / 1e6:.0f}M params) "
          f"in {m.load_seconds:.1f}s", file=sys.stderr)
    out = screen.run(cfg, m, mesh, log=lambda s: print(s, file=sys.stderr))
    print(out["table"], end="")
    print(f"wrote {cfg.out_dir}/screen.json, screen.md, screen.png", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    """Benchmarks: `sjax bench sample|numbers|train|eval|judge [CONFIG] [k=v]`."""
    what = args.config
    runners = {"sample": bench_sample.bench_sample, "numbers": bench_numbers.bench_numbers,
               "train": bench_train.bench_train, "eval": bench_eval.bench_eval,
               "judge": bench_judge.bench_judge}
    if what not in runners:
        raise SjaxError(f"bench: unknown benchmark {what!r} (known: {', '.join(runners)})")
    overrides = list(args.overrides)
    preset = overrides.pop(0) if overrides and "=" not in overrides[0] else None
    cfg = config.BenchConfig() if preset is None else config.load_preset(preset)
    cfg = config.apply_overrides(cfg, overrides)
    runners[what](cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sjax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("run", cmd_run), ("chat", cmd_chat), ("info", cmd_info),
                     ("export", cmd_export), ("mnist", cmd_mnist), ("bench", cmd_bench),
                     ("train", cmd_train), ("smoke", cmd_smoke), ("screen", cmd_screen)):
        s = sub.add_parser(name, help=fn.__doc__.splitlines()[0])
        if name == "export":
            s.add_argument("--out", required=True, help="folder to write")
        if name == "run":
            s.add_argument("--force", action="append", metavar="STAGE",
                           help="redo this stage (repeatable)")
            s.add_argument("--dry-run", action="store_true",
                           help="validate, print the plan and memory estimate, run nothing")
            s.add_argument("--reuse", type=Path, metavar="RUN_DIR",
                           help="copy the stages that finished in RUN_DIR under the same key "
                                "(another arm's teachers and data) instead of redoing them")
            s.add_argument("--devices", type=int, default=0,
                           help="plan for this many devices (with --dry-run)")
        s.add_argument("config", nargs="?", help="preset in configs/ or a .py path, :SIZE "
                                                 "for one with sizes (e.g. owl:smoke)")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        s.set_defaults(fn=fn)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if any(x.startswith("-") for x in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(args.overrides) + extra  # overrides may follow options too
    try:
        distributed.initialize()  # only when launched across processes / hosts
        return args.fn(args)
    except SjaxError as e:
        print(f"sjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
