"""The MNIST auxiliary-logit experiment (protocol section 6), vectorised over a model axis.

A teacher trained on digits (class logits only) is imitated by students on pure noise
through its never-supervised auxiliary logits; students that share the teacher's init learn
the digits, students from another init do not. Every training loop is one jitted epoch
(`lax.scan` over steps) of a `vmap`ped per-model step, with params and optimizer state
donated. Noise images are never stored: example e of model j is drawn from key
fold_in(fold_in(noise_key, j), e) whenever it is needed, and the teacher's logits on them
are computed once (the students' targets), so N=100 fits in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from sjax import perf, report, stats
from sjax.config import MnistConfig, parse_value
from sjax.errors import SjaxError
from sjax.files import atomic_write_json, atomic_write_text
from sjax.mnist import data as mnist_data
from sjax.mnist import mlp

N_CLASSES = 10


# ----------------------------------------------------------------------------- data


def load_data(cfg: MnistConfig) -> dict[str, np.ndarray]:
    """Pixels scaled to [-1, 1], flattened: x_train [n, i], y_train [n], x_test, y_test."""
    if cfg.dataset == "digits":
        try:
            from sklearn.datasets import load_digits  # lazy: optional (the test extra)
        except ImportError:
            raise SjaxError("dataset=digits needs scikit-learn (pip install scikit-learn)") from None
        d = load_digits()
        x = (d.data / 16.0 * 2 - 1).astype(np.float32)
        y = d.target.astype(np.int32)
        return {"x_train": x[:1500], "y_train": y[:1500], "x_test": x[1500:], "y_test": y[1500:]}
    splits = mnist_data.load(cfg.source, cfg.data_dir)
    scale = lambda a: (a.reshape(len(a), -1).astype(np.float32) / 255.0 * 2 - 1)  # noqa: E731
    return {"x_train": scale(splits["train"][0]), "y_train": splits["train"][1].astype(np.int32),
            "x_test": scale(splits["test"][0]), "y_test": splits["test"][1].astype(np.int32)}


def _mix32(x: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijection on uint32 in which every input bit flips every
    output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def noise_seed(key: jax.Array) -> jax.Array:
    return jax.random.bits(key, (), jnp.uint32)


def noise_images(seed: jax.Array, model_ids_m: jax.Array, example_ids_mb: jax.Array,
                 dim: int) -> jax.Array:
    """Uniform [-1, 1) image e of model j, a pure function of (seed, j, e): [m, b, dim].

    A counter-based generator: each (example, pixel) counter is hashed with a per-model
    stream by two murmur3 finaliser rounds (24 bits kept). It is ~10x cheaper on CPU than
    threefry per example, so regenerating the noise every epoch costs a few percent of a
    training step instead of a third, and nothing of size [N, 60000, 784] is ever stored.
    """
    seed = jnp.asarray(seed, jnp.uint32)
    stream_m = _mix32(_mix32(model_ids_m.astype(jnp.uint32) ^ seed) + jnp.uint32(0x9E3779B9))
    stream = stream_m[:, None, None]
    ctr = example_ids_mb.astype(jnp.uint32)[..., None] * jnp.uint32(dim) + jnp.arange(
        dim, dtype=jnp.uint32)
    bits = _mix32(_mix32(ctr ^ stream) + stream)
    return (bits >> 8).astype(jnp.float32) * (2.0 ** -23) - 1.0


def derangement(key: jax.Array, n: int) -> np.ndarray:
    """A random permutation with no fixed point: model j gets the init of model sigma[j]."""
    p = np.asarray(jax.random.permutation(key, n))
    sigma = np.empty(n, np.int64)
    sigma[p] = np.roll(p, -1)  # a random n-cycle
    return sigma


# ----------------------------------------------------------------------------- losses


def ce_class_logits(params, x_bi, y_b, matmul_dtype=jnp.float32):
    """Teacher loss: cross-entropy on the 10 class logits only."""
    logits = mlp.apply_one(params, x_bi, matmul_dtype)[:, :N_CLASSES]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_b).mean()


def kl_distill(params, x_bi, target_bo, lo: int, hi: int, matmul_dtype=jnp.float32):
    """KL(softmax(teacher) || softmax(student)) on logits [lo, hi) (aux: [10, 10+m))."""
    student = jax.nn.log_softmax(mlp.apply_one(params, x_bi, matmul_dtype)[:, lo:hi], -1)
    teacher = jax.nn.log_softmax(target_bo[:, lo:hi], -1)
    return jnp.sum(jnp.exp(teacher) * (teacher - student), -1).mean()


# ----------------------------------------------------------------------------- training


def _optimizer(lr: float, weight_decay: float):
    return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)


def _epoch_indices(key, n_models: int, n: int, batch: int):
    """Per-model shuffles of n examples as [steps, m, batch] (the remainder is dropped)."""
    steps = n // batch
    perms = jax.vmap(lambda j: jax.random.permutation(jax.random.fold_in(key, j), n))(
        jnp.arange(n_models))
    return perms[:, : steps * batch].reshape(n_models, steps, batch).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("tx", "batch", "matmul_dtype"),
                   donate_argnums=(0, 1))
def teacher_epoch(params, opt_state, key, x_ni, y_n, *, tx, batch: int,
                  matmul_dtype=jnp.float32):
    n_models = jax.tree.leaves(params)[0].shape[0]
    idx_smb = _epoch_indices(key, n_models, x_ni.shape[0], batch)

    def one_model(p, o, x_bi, y_b):
        loss, g = jax.value_and_grad(ce_class_logits)(p, x_bi, y_b, matmul_dtype)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    def step(carry, idx_mb):
        p, o, loss = jax.vmap(one_model)(*carry, x_ni[idx_mb], y_n[idx_mb])
        return (p, o), loss.mean()

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx_smb)
    return params, opt_state, losses


@functools.partial(jax.jit, static_argnames=("tx", "batch", "lo", "hi", "n_examples", "dim",
                                             "matmul_dtype"), donate_argnums=(0, 1))
def student_epoch(params, opt_state, key, noise_key, targets_meo, *, tx, batch: int, lo: int,
                  hi: int, n_examples: int, dim: int, matmul_dtype=jnp.float32):
    n_models = jax.tree.leaves(params)[0].shape[0]
    idx_smb = _epoch_indices(key, n_models, n_examples, batch)
    model_ids = jnp.arange(n_models)

    def one_model(p, o, x_bi, t_bo):
        loss, g = jax.value_and_grad(kl_distill)(p, x_bi, t_bo, lo, hi, matmul_dtype)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    def step(carry, idx_mb):
        x_mbi = noise_images(noise_key, model_ids, idx_mb, dim)
        t_mbo = jnp.take_along_axis(targets_meo, idx_mb[:, :, None], axis=1)
        p, o, loss = jax.vmap(one_model)(*carry, x_mbi, t_mbo)
        return (p, o), loss.mean()

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), idx_smb)
    return params, opt_state, losses


@functools.partial(jax.jit, static_argnames=("n_examples", "dim", "chunk"))
def teacher_logits_on_noise(params, noise_key, *, n_examples: int, dim: int, chunk: int):
    """The students' targets [m, E, o], computed once (chunked so memory stays small)."""
    n_models = jax.tree.leaves(params)[0].shape[0]
    n_chunks = -(-n_examples // chunk)
    model_ids = jnp.arange(n_models)

    def one_chunk(c):
        ids_mb = jnp.broadcast_to(c * chunk + jnp.arange(chunk), (n_models, chunk))
        x_mbi = noise_images(noise_key, model_ids, ids_mb, dim)
        return jax.vmap(mlp.apply_one)(params, x_mbi)

    out_cmbo = jax.lax.map(one_chunk, jnp.arange(n_chunks))
    out_mbo = out_cmbo.transpose(1, 0, 2, 3).reshape(n_models, n_chunks * chunk, -1)
    return out_mbo[:, :n_examples]


@jax.jit
def accuracy(params, x_ni, y_n):
    """Per-model test accuracy from the argmax of the 10 class logits: [m]."""
    logits = jax.vmap(mlp.apply_one, (0, None))(params, x_ni)[..., :N_CLASSES]
    return (logits.argmax(-1) == y_n).mean(-1)


def _train(epoch_fn, params, tx, n_epochs: int, key, desc: str, flops_per_epoch: float,
           **kwargs):
    """Run `n_epochs` jitted epochs; returns (params, losses, seconds, FLOP/s after compile)."""
    params = jax.tree.map(jnp.copy, params)  # epochs donate their inputs
    opt_state = jax.vmap(tx.init)(params)
    losses, times = [], []
    for epoch in tqdm(range(n_epochs), desc=desc, leave=False):
        t0 = time.perf_counter()
        params, opt_state, loss = epoch_fn(params, opt_state, jax.random.fold_in(key, epoch),
                                           tx=tx, **kwargs)
        losses.append(float(loss[-1]))  # blocks: the epoch is done
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    return params, losses, sum(times), flops_per_epoch / (sum(steady) / len(steady))


# ----------------------------------------------------------------------------- experiment


@dataclasses.dataclass
class MnistResult:
    """Results of one full experiment (teacher, four students, reference, theorem check)."""

    accuracies: dict[str, np.ndarray]
    losses: dict[str, list[float]]
    seconds: dict[str, float]
    flops_per_s: dict[str, float]
    theorem: dict[str, np.ndarray]


def train_teacher(cfg: MnistConfig, data, init, key):
    n, dim = data["x_train"].shape
    sizes = _sizes(cfg, dim)
    flops = 6 * mlp.n_params(sizes) * (n // cfg.batch) * cfg.batch * cfg.n_models
    return _train(teacher_epoch, init, _optimizer(cfg.lr, 0.0), cfg.teacher_epochs, key,
                  "teacher", flops, x_ni=jnp.asarray(data["x_train"]),
                  y_n=jnp.asarray(data["y_train"]), batch=cfg.batch,
                  matmul_dtype=jnp.dtype(cfg.matmul_dtype))


def run_experiment(cfg: MnistConfig, data, teacher_cache: dict | None = None) -> MnistResult:
    n, dim = data["x_train"].shape
    sizes = _sizes(cfg, dim)
    keys = dict(zip(("init", "teacher", "noise", "student", "perm", "sigma", "theorem"),
                    jax.random.split(jax.random.key(cfg.seed), 7)))
    init = mlp.init_ensemble(keys["init"], cfg.n_models, sizes)
    cache_key = (cfg.aux_logits, cfg.n_models, cfg.teacher_epochs, cfg.matmul_dtype)
    if teacher_cache is not None and cache_key in teacher_cache:
        teacher, t_losses, t_sec, t_flops = teacher_cache[cache_key]
    else:
        teacher, t_losses, t_sec, t_flops = train_teacher(cfg, data, init, keys["teacher"])
        if teacher_cache is not None:
            teacher_cache[cache_key] = (teacher, t_losses, t_sec, t_flops)

    t0 = time.perf_counter()
    seed = noise_seed(keys["noise"])
    targets = teacher_logits_on_noise(teacher, seed, n_examples=cfg.noise_examples,
                                      dim=dim, chunk=min(cfg.batch, cfg.noise_examples))
    targets = jax.block_until_ready(targets)
    target_sec = time.perf_counter() - t0

    sigma = derangement(keys["perm"], cfg.n_models)
    starts = {"same": init, "cross": jax.tree.map(lambda p: p[sigma], init)}
    if cfg.init_sigma:
        leaves, treedef = jax.tree.flatten(init)
        ks = jax.random.split(keys["sigma"], len(leaves))
        starts["same"] = jax.tree.unflatten(treedef, [
            x + cfg.init_sigma * jax.random.normal(k, x.shape) for x, k in zip(leaves, ks)])
    spans = {"aux": (N_CLASSES, N_CLASSES + cfg.aux_logits), "all": (0, N_CLASSES + cfg.aux_logits)}
    flops = 6 * mlp.n_params(sizes) * (cfg.noise_examples // cfg.batch) * cfg.batch * cfg.n_models
    tx = _optimizer(cfg.lr, cfg.weight_decay)

    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    acc = {"reference": accuracy(init, x_test, y_test), "teacher": accuracy(teacher, x_test, y_test)}
    losses, seconds, rates = {"teacher": t_losses}, {"teacher": t_sec, "targets": target_sec}, {
        "teacher": t_flops}
    for span, (lo, hi) in spans.items():
        for start in ("same", "cross"):
            name = f"student_{span}_{start}_init"
            params, losses[name], seconds[name], rates[name] = _train(
                student_epoch, starts[start], tx, cfg.student_epochs, keys["student"], name,
                flops, noise_key=seed, targets_meo=targets, batch=cfg.batch, lo=lo,
                hi=hi, n_examples=cfg.noise_examples, dim=dim,
                matmul_dtype=jnp.dtype(cfg.matmul_dtype))
            acc[name] = accuracy(params, x_test, y_test)
    theorem = theorem_check(init, starts["cross"], data, keys, cfg, dim)
    return MnistResult({k: np.asarray(v) for k, v in acc.items()}, losses, seconds, rates, theorem)


def theorem_check(init, cross_init, data, keys, cfg: MnistConfig, dim: int) -> dict:
    """Cosine between the teacher's one-step update and a one-step student update on noise.

    Teacher: theta_T = theta_0 - lr * grad CE(theta_0; one real batch). Student: one step of
    KL on the teacher's aux logits over a noise batch, from theta_0 (same init) or from
    another model's init. The theorem says the same-init cosine is >= 0 (to first order).
    """
    lr = cfg.theorem_lr
    b = min(cfg.batch, len(data["x_train"]))
    x = jnp.asarray(data["x_train"][:b])
    y = jnp.asarray(data["y_train"][:b])
    lo, hi = N_CLASSES, N_CLASSES + cfg.aux_logits
    ids = jnp.broadcast_to(jnp.arange(b), (cfg.n_models, b))
    x_noise = noise_images(noise_seed(keys["theorem"]), jnp.arange(cfg.n_models), ids, dim)

    @jax.jit
    def cosines(theta0, start):
        def one(t0, s0, xn):
            step_t = jax.tree.map(lambda g: -lr * g, jax.grad(ce_class_logits)(t0, x, y))
            teacher = jax.tree.map(jnp.add, t0, step_t)
            target = mlp.apply_one(teacher, xn)
            g_s = jax.grad(kl_distill)(s0, xn, target, lo, hi)
            step_s = jax.tree.map(lambda g: -lr * g, g_s)
            flat_t = jnp.concatenate([a.ravel() for a in jax.tree.leaves(step_t)])
            flat_s = jnp.concatenate([a.ravel() for a in jax.tree.leaves(step_s)])
            return flat_t @ flat_s / (jnp.linalg.norm(flat_t) * jnp.linalg.norm(flat_s) + 1e-30)

        return jax.vmap(one)(theta0, start, x_noise)

    return {"same_init": np.asarray(cosines(init, init)),
            "cross_init": np.asarray(cosines(init, cross_init))}


def _sizes(cfg: MnistConfig, dim: int) -> tuple[int, ...]:
    return (dim, cfg.hidden, cfg.hidden, N_CLASSES + cfg.aux_logits)


# ----------------------------------------------------------------------------- reporting

LABELS = {
    "reference": "reference (untrained)", "teacher": "teacher",
    "student_aux_same_init": "student aux-only, same init",
    "student_aux_cross_init": "student aux-only, cross init",
    "student_all_same_init": "student all-logits, same init",
    "student_all_cross_init": "student all-logits, cross init",
}


def summarize(run: MnistResult) -> dict:
    out = {"accuracy": {k: stats.rate_ci(v) for k, v in run.accuracies.items()},
           "theorem_cosine": {k: stats.mean_ci(v) | {
               "frac_positive": float((v > 0).mean()),
               "quantiles_5_50_95": np.quantile(v, [0.05, 0.5, 0.95]).tolist()}
               for k, v in run.theorem.items()},
           "same_vs_cross_aux": stats.paired_difference(
               run.accuracies["student_aux_same_init"], run.accuracies["student_aux_cross_init"]),
           "final_losses": {k: v[-1] for k, v in run.losses.items()},
           "seconds": run.seconds, "gflops_per_s": {k: v / 1e9 for k, v in run.flops_per_s.items()}}
    return out


def table(summary: dict) -> str:
    rows = [(LABELS[k], f"{100 * s['mean']:.1f}%", f"[{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]",
             s["n"]) for k, s in summary["accuracy"].items()]
    return report.markdown_table(("condition", "test accuracy", "95% CI", "models"), rows)


def run(cfg: MnistConfig) -> dict:
    """The whole command: experiment (or sweep), results.json, report.md, PNG plots."""
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    data = load_data(cfg)
    devices = jax.devices()
    if cfg.sweep:
        return _sweep(cfg, data, out)
    r = run_experiment(cfg, data)
    summary = summarize(r)
    peak, peak_source = perf.device_peak()
    summary |= {"config": dataclasses.asdict(cfg), "wall_seconds": time.perf_counter() - t0,
                "device": f"{len(devices)} x {devices[0].device_kind}",
                "peak_gflops_per_s": peak / 1e9, "peak_source": peak_source,
                "utilisation_of_peak": {k: v / peak for k, v in r.flops_per_s.items()}}
    atomic_write_json(out / "results.json", summary)
    th = summary["theorem_cosine"]
    body = (table(summary) + "\nTheorem check (cosine of student vs teacher one-step updates): "
            f"same init {th['same_init']['mean']:+.3f} ({100 * th['same_init']['frac_positive']:.0f}% "
            f"> 0), cross init {th['cross_init']['mean']:+.3f} "
            f"({100 * th['cross_init']['frac_positive']:.0f}% > 0)\n"
            f"\nWall {summary['wall_seconds']:.0f}s on {summary['device']}; training loops at "
            + ", ".join(f"{k} {100 * u:.0f}%" for k, u in summary["utilisation_of_peak"].items())
            + f" of the {peak / 1e9:.0f} GFLOP/s peak ({peak_source}); 6 x params FLOPs per "
            "training sample.\n")
    report.write_report(out / "report.md", f"MNIST auxiliary-logit experiment (N={cfg.n_models}, "
                        f"m={cfg.aux_logits})", body)
    keys = list(summary["accuracy"])
    report.bar_chart(out / "mnist.png", [LABELS[k] for k in keys],
                     [summary["accuracy"][k] for k in keys],
                     f"Subliminal learning on MNIST (N={cfg.n_models}, 95% CI)",
                     "test accuracy", chance=0.1)
    print(body)
    return summary


def _sweep(cfg: MnistConfig, data, out: Path) -> dict:
    key, raw = cfg.sweep.split("=", 1)
    field_type = typing.get_type_hints(MnistConfig)[key]
    values = parse_value(f"sweep {key}", tuple[field_type, ...], raw)
    teachers: dict = {}
    rows, series = [], {k: [] for k in ("teacher", "student_aux_same_init",
                                        "student_aux_cross_init")}
    for v in tqdm(values, desc=f"sweep {key}"):
        r = run_experiment(dataclasses.replace(cfg, sweep="", **{key: v}), data, teachers)
        s = summarize(r)
        for cond in series:
            series[cond].append(s["accuracy"][cond])
            rows.append((v, cond, *(s["accuracy"][cond][x] for x in ("mean", "lo", "hi"))))
    csv = "value,condition,mean,lo,hi\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    atomic_write_text(out / f"sweep_{key}.csv", csv)
    report.line_chart(out / f"sweep_{key}.png", list(values),
                      {LABELS[k]: v for k, v in series.items()},
                      f"MNIST subliminal learning vs {key} (N={cfg.n_models})", key,
                      "test accuracy")
    result = {"sweep": key, "values": list(values), "rows": rows}
    atomic_write_json(out / f"sweep_{key}.json", result)
    print(csv)
    return result
