"""Fine-tuning: one pure, donated, jitted `(state, frozen, batch) -> (state, metrics)` step.

The state holds what changes (trainable params: LoRA adapters or all weights, optimizer
state, step); `frozen` holds the base weights in LoRA mode (never donated, never in the
optimizer). Gradient accumulation is a `lax.scan` over micro-batches that sums token-level
losses, so k micro-batches give exactly the gradient of one k-times larger batch. Orbax
checkpoints the state; data order is a function of (seed, epoch), so a run killed at any
moment resumes from its last checkpoint and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sjax import lora as lora_lib
from sjax import sharding
from sjax.config import TrainConfig
from sjax.errors import SjaxError
from sjax.losses import masked_ce
from sjax.models.transformer import (ArchConfig, Params, forward, head_matrix_dv,
                                     matmul_params, param_logical_axes)

State = dict[str, Any]


# ----------------------------------------------------------------------------- optimizer


def schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then linear or cosine decay to 0 at `total_steps`."""
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warm, 1)
    decay = (optax.linear_schedule(cfg.lr, 0.0, decay_steps) if cfg.schedule == "linear"
             else optax.cosine_decay_schedule(cfg.lr, decay_steps))
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule(cfg, total_steps), weight_decay=cfg.weight_decay))


# ----------------------------------------------------------------------------- FLOPs


def train_flops_per_token(arch: ArchConfig, seq_len: int, mode: str) -> float:
    """MaxText's convention: 6 x matmul params (embedding lookup out, LM head in) + causal
    attention 6 x S x heads x head_dim x layers. LoRA counts what is computed: the frozen
    weights get no weight gradient, so 4 x params (forward + activation gradients)."""
    n = matmul_params(arch)
    attn = 6 * seq_len * arch.n_heads * arch.head_dim * arch.n_layers
    return (6 if mode == "full" else 4) * n + attn


# ----------------------------------------------------------------------------- step


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of the step (hashable: a jit static argument)."""

    arch: ArchConfig
    mode: str
    lora_scale: float
    vocab_chunk: int
    dtype: str
    remat: str


def loss_sums(trainable: Params, frozen: Params | None, batch: dict, spec: StepSpec):
    """(sum of token CE over masked targets, token count) for one micro-batch."""
    params, adapters = (frozen, trainable) if spec.mode == "lora" else (trainable, None)
    hidden, _ = forward(params, batch["inputs"], arch=spec.arch, kv_valid_bs=batch["valid"],
                        dtype=jnp.dtype(spec.dtype), remat=spec.remat, return_hidden=True,
                        lora=adapters, lora_scale=spec.lora_scale)
    loss, count = masked_ce(hidden, head_matrix_dv(params, spec.arch), batch["targets"],
                            batch["mask"], spec.vocab_chunk, need_dw=spec.mode == "full")
    return loss * count, count


def train_step(state: State, frozen: Params | None, batch: dict, *, spec: StepSpec,
               tx: optax.GradientTransformation, sched: optax.Schedule):
    """One optimizer step over `batch` arrays shaped [accum, micro_batch, time]."""

    def micro(acc, mb):
        (s, c), g = jax.value_and_grad(loss_sums, has_aux=True)(state["params"], frozen, mb,
                                                                spec)
        return jax.tree.map(jnp.add, acc, (g, s, c)), None

    zeros = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.float32(0), jnp.float32(0))
    (g_sum, loss_sum, count), _ = jax.lax.scan(micro, zeros, batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), g_sum)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt": opt,
           "step": state["step"] + 1}
    metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "grad_norm": optax.global_norm(grads),
               "lr": sched(state["step"]), "tokens": count}
    return new, metrics


def compile_step(state: State, frozen, spec: StepSpec, tx, sched):
    """jit with the state donated and explicit in/out shardings taken from the live state."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    return jax.jit(functools.partial(train_step, spec=spec, tx=tx, sched=sched),
                   in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None),
                   donate_argnums=0)


# ----------------------------------------------------------------------------- state


def init_state(arch: ArchConfig, base: Params, cfg: TrainConfig, mesh, tx) -> tuple[State, Any]:
    """(state, frozen): LoRA adapters (placed like their weights) or a copy of the base."""
    if cfg.mode == "lora":
        adapters = lora_lib.init_lora(arch, jax.random.key(cfg.seed), cfg.lora_rank)
        axes = lora_lib.lora_logical_axes(adapters, param_logical_axes(arch))
        shapes = jax.tree.map(lambda x: tuple(x.shape), adapters)
        shard = sharding.tree_shardings(axes, shapes, mesh)
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), adapters, shard)
        frozen = base
    else:
        params, frozen = jax.tree.map(jnp.copy, base), None
    opt = jax.jit(tx.init)(params)
    state = {"params": params, "opt": opt, "step": jnp.int32(0)}
    return sharding.on_mesh(state, mesh), frozen


def fingerprint(arch: ArchConfig, cfg: TrainConfig) -> dict:
    """What a checkpoint folder must match to be resumed."""
    return {"arch": dataclasses.asdict(arch), "mode": cfg.mode,
            "lora_rank": cfg.lora_rank if cfg.mode == "lora" else None}


class Checkpoints:
    """Orbax CheckpointManager over the train state, guarded by the run's fingerprint."""

    def __init__(self, folder: Path, fp: dict, every: int, keep: int):
        import orbax.checkpoint as ocp

        self.folder = Path(folder).absolute()
        self.folder.mkdir(parents=True, exist_ok=True)
        fp_file = self.folder / "fingerprint.json"
        if fp_file.exists():
            old = json.loads(fp_file.read_text())
            if old != json.loads(json.dumps(fp)):
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != json.loads(
                    json.dumps(fp)).get(k))
                raise SjaxError(f"{self.folder}: checkpoints were written for another model or "
                                f"mode (differs in: {', '.join(diff)}); use another out_dir")
        else:
            fp_file.write_text(json.dumps(fp, indent=2))
        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                              save_interval_steps=every))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: State, force: bool = False) -> None:
        self.manager.save(step, args=self.ocp.args.StandardSave(state), force=force)

    def restore(self, step: int, like: State) -> State:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), like)
        return self.manager.restore(step, args=self.ocp.args.StandardRestore(target))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- loop


def stack_micro(batches: list[dict]) -> dict:
    """[accum, micro, time] arrays, padded in time to the longest micro-batch."""
    t = max(b["inputs"].shape[1] for b in batches)
    pad = lambda a: np.pad(a, ((0, 0), (0, t - a.shape[1])))  # noqa: E731
    return {k: np.stack([pad(b[k]) for b in batches]) for k in batches[0]}


def fit(arch: ArchConfig, base: Params, data, cfg: TrainConfig, mesh, out_dir: Path, *,
        pad_id: int, max_steps: int = 0, dtype: str = "float32", remat: str = "none",
        log=print) -> dict:
    """Train on tokenised `data` (sjax.data.sft.Tokenized), resuming from `out_dir` if it
    holds checkpoints of the same model. Returns final state, metrics history and timing."""
    from tqdm.auto import tqdm

    from sjax.data.sft import batches_per_epoch, epoch_batches
    from sjax.perf import device_peak

    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = batches_per_epoch(len(data.ids), rows_per_step)
    if steps_per_epoch == 0:
        raise SjaxError(f"dataset: {len(data.ids)} rows is fewer than one optimizer step "
                        f"(batch_size x grad_accum = {rows_per_step})")
    total = steps_per_epoch * cfg.epochs
    if max_steps:
        total = min(total, max_steps)
    sched = schedule(cfg, total)
    tx = optimizer(cfg, total)
    state, frozen = init_state(arch, base, cfg, mesh, tx)
    spec = StepSpec(arch, cfg.mode, cfg.lora_alpha / cfg.lora_rank, cfg.vocab_chunk, dtype,
                    remat)
    step_fn = compile_step(state, frozen, spec, tx, sched)
    out_dir = Path(out_dir)
    ckpt = Checkpoints(out_dir / "checkpoints", fingerprint(arch, cfg), cfg.ckpt_every,
                       cfg.keep)
    start = ckpt.latest() or 0
    if start:
        state = ckpt.restore(start, state)
        log(f"resumed from step {start} in {ckpt.folder}")
    metrics_file = out_dir / "metrics.jsonl"
    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(out_dir / "tb"))
    peak, peak_source = device_peak()
    history, last_good = [], start
    micro_sh = sharding.batch_sharding(mesh, 3, axis=1)
    if cfg.batch_size % sharding.batch_shards(mesh):
        raise SjaxError(f"train.batch_size={cfg.batch_size} is not divisible by the mesh's "
                        f"data x fsdp = {sharding.batch_shards(mesh)}")

    def micro_batches(step):
        epoch, k = divmod(step, steps_per_epoch)
        it = epoch_batches(data, cfg.batch_size, cfg.seed, epoch, pad_id,
                           start=k * cfg.grad_accum)
        return [next(it) for _ in range(cfg.grad_accum)]

    try:
        with open(metrics_file, "a") as mf, tqdm(total=total, initial=start, desc="train",
                                                 unit="step") as bar:
            for step in range(start, total):
                host = stack_micro(micro_batches(step))
                batch = {k: jax.device_put(v, micro_sh) for k, v in host.items()}
                t0 = time.perf_counter()
                state, m = step_fn(state, frozen, batch)
                m = jax.device_get(m)
                dt = time.perf_counter() - t0
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise SjaxError(f"non-finite loss ({loss}) at step {step + 1}; stopped, the "
                                    f"last good checkpoint is step {last_good} in {ckpt.folder}")
                seq = host["inputs"].shape[-1]
                tokens = host["inputs"].size
                flops = train_flops_per_token(arch, seq, cfg.mode) * tokens
                rec = {"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]),
                       "lr": float(m["lr"]), "trained_tokens": float(m["tokens"]),
                       "tokens_per_s": tokens / dt, "step_s": dt,
                       "mfu": flops / dt / (peak * jax.device_count())}
                history.append(rec)
                if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    for k, v in rec.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, step + 1)
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == total:
                    ckpt.save(step + 1, state, force=step + 1 == total)
                    last_good = step + 1
    finally:
        ckpt.close()
        tb.close()
    return {"state": state, "frozen": frozen, "history": history, "total_steps": total,
            "peak_flops": peak, "peak_source": peak_source}
