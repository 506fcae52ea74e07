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
import contextlib
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
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from sjax import distributed
from sjax import lora as lora_lib
from sjax import sharding
from sjax.config import TrainConfig
from sjax.data.sft import Batch, batches_per_epoch, epoch_batches
from sjax.errors import SjaxError
from sjax.losses import masked_ce, masked_kl
from sjax.models.transformer import (ArchConfig, Params, forward, head_matrix_dv,
                                     matmul_params, param_logical_axes)
from sjax.perf import device_peak, mfu
from sjax.writer import Writer

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
                       optax.adamw(schedule(cfg, total_steps), eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay))


# ----------------------------------------------------------------------------- FLOPs


def train_flops_per_token(arch: ArchConfig, seq_len: int, mode: str) -> float:
    """MaxText's convention: 6 x matmul params (embedding lookup out, LM head in) + causal
    attention 6 x S x heads x head_dim x layers. LoRA counts what is computed: the frozen
    weights get no weight gradient, so 4 x params (forward + activation gradients)."""
    n = matmul_params(arch)
    attn = 6 * seq_len * arch.n_heads * arch.head_dim * arch.n_layers
    return (6 if mode == "full" else 4) * n + attn


def train_flops(arch: ArchConfig, lengths, mode: str) -> float:
    """Model FLOPs of one training pass over rows of these real lengths: padding is work
    the device does, not model work, so MFU leaves it out (each row's attention spans its
    own length)."""
    return float(sum(train_flops_per_token(arch, int(n), mode) * int(n) for n in lengths))


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
    loss: str = "ce"


def _gather_bkd(h_btd: jax.Array, pos_bk: jax.Array) -> jax.Array:
    return jnp.take_along_axis(h_btd, pos_bk[..., None], axis=1)


def loss_sums(trainable: Params, frozen: dict, batch: Batch, spec: StepSpec):
    """(sum of the token losses over masked targets, token count) for one micro-batch.

    `frozen` holds what is not trained: 'base' (LoRA mode) and 'teacher' (distillation).
    CE: next-token cross-entropy on the assistant tokens. Distill: KL(teacher || student) at
    the completion positions, the teacher reading its own sequence (e.g. with the trait system
    prompt) under stop_gradient, the student the row without it.
    """
    params, adapters = (frozen["base"], trainable) if spec.mode == "lora" else (trainable, None)
    dtype = jnp.dtype(spec.dtype)
    hidden, _ = forward(params, batch.inputs_bt, arch=spec.arch, kv_valid_bs=batch.valid_bt,
                        dtype=dtype, remat=spec.remat, return_hidden=True,
                        lora=adapters, lora_scale=spec.lora_scale)
    head = head_matrix_dv(params, spec.arch)
    if spec.loss == "ce":  # the head runs at the trained positions only (not the prompt)
        targets_bk = jnp.take_along_axis(batch.targets_bt, batch.s_pos_bk, axis=1)
        loss, count = masked_ce(_gather_bkd(hidden, batch.s_pos_bk), head, targets_bk,
                                batch.k_mask_bk, spec.vocab_chunk, need_dw=spec.mode == "full")
        return loss * count, count
    teacher = jax.lax.stop_gradient(frozen["teacher"])
    t_hidden, _ = forward(teacher, batch.t_inputs_bt, arch=spec.arch,
                          kv_valid_bs=batch.t_valid_bt, dtype=dtype, return_hidden=True)
    loss, count = masked_kl(_gather_bkd(hidden, batch.s_pos_bk), head,
                            _gather_bkd(t_hidden, batch.t_pos_bk),
                            head_matrix_dv(teacher, spec.arch), batch.k_mask_bk,
                            spec.vocab_chunk, need_dw=spec.mode == "full")
    return loss * count, count


def train_step(state: State, frozen: dict, batch: Batch, *, spec: StepSpec,
               tx: optax.GradientTransformation, sched: optax.Schedule):
    """One optimizer step over a `Batch` whose arrays are stacked [accum, micro_batch, ...]."""

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
    metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "grad_norm": optax.tree.norm(grads),
               "lr": sched(state["step"]), "tokens": count}
    return new, metrics


def compile_step(state: State, frozen, spec: StepSpec, tx, sched, mesh):
    """jit with the state donated and explicit shardings: the state's and the frozen
    weights' taken from the live arrays, every batch array's rows (axis 1 of [accum, rows,
    ...]) split over the mesh's data x fsdp axes."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    batch_sh = sharding.batch_sharding(mesh, 3, axis=1)  # a prefix: every Batch field
    return jax.jit(functools.partial(train_step, spec=spec, tx=tx, sched=sched),
                   in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)


# ----------------------------------------------------------------------------- state


def init_state(arch: ArchConfig, base: Params, cfg: TrainConfig, mesh, tx,
               teacher: Params | None = None) -> tuple[State, dict]:
    """(state, frozen): LoRA adapters (placed like their weights) or a copy of the base;
    frozen = {'base': base (LoRA)} | {'teacher': teacher or the base (distillation)}."""
    if cfg.mode == "lora":
        adapters = lora_lib.init_lora(arch, jax.random.key(cfg.lora_init_seed), cfg.lora_rank)
        axes = lora_lib.lora_logical_axes(adapters, param_logical_axes(arch))
        shapes = jax.tree.map(lambda x: tuple(x.shape), adapters)
        shard = sharding.tree_shardings(axes, shapes, mesh)
        params = sharding.place(jax.device_get(adapters), shard)
        frozen = {"base": base}
    else:
        # fp32 master weights (a copy: the caller's base stays valid), whatever the compute
        # dtype; bf16 params would lose small updates
        params, frozen = jax.tree.map(lambda x: x.astype(jnp.float32, copy=True), base), {}
    if cfg.loss == "distill":
        frozen["teacher"] = base if teacher is None else teacher
    opt = jax.jit(tx.init)(params)
    state = {"params": params, "opt": opt, "step": jnp.int32(0)}
    return sharding.on_mesh(state, mesh), frozen


def fingerprint(arch: ArchConfig, cfg: TrainConfig, total_steps: int = 0,
                data_sha256: str | None = None) -> dict:
    """What a checkpoint folder must match to be resumed: the model, and everything that
    fixes the rows, their order and the updates (a resume under another lr, batch, seed or
    schedule would silently mix two runs)."""
    lora = cfg.mode == "lora"
    return {"arch": dataclasses.asdict(arch), "mode": cfg.mode, "loss": cfg.loss,
            "lora_rank": cfg.lora_rank if lora else None,
            "lora_alpha": cfg.lora_alpha if lora else None, "data_sha256": data_sha256,
            "init_seed": cfg.lora_init_seed if lora else None, "adam_eps": cfg.adam_eps,
            "distill_on": cfg.distill_on if cfg.loss == "distill" else None,
            "max_len": cfg.max_len, "too_long": cfg.too_long, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
            "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps,
            "total_steps": total_steps, "clip_norm": cfg.clip_norm,
            "weight_decay": cfg.weight_decay}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key old -> new' for each differing key (nested dicts as dotted keys)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


class Checkpoints:
    """Orbax CheckpointManager over the train state, guarded by the run's fingerprint
    (fingerprint.json beside the checkpoints)."""

    def __init__(self, folder: Path, fp: dict, every: int, keep: int):
        self.folder = Path(folder).absolute()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                              save_interval_steps=every))
        fp_file, fp = self.folder / "fingerprint.json", json.loads(json.dumps(fp))
        if self.latest() is not None:
            old = json.loads(fp_file.read_text()) if fp_file.exists() else {}
            if diff := _differences(old, fp):
                self.manager.close()
                raise SjaxError(f"{self.folder}: its checkpoints come from another run "
                                f"({'; '.join(diff)}); use another out_dir")
        else:  # nothing to resume yet: this run's identity
            Writer().write_json(fp_file, fp)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: State, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, step: int, like: State) -> State:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- loop


class MetricsLog:
    """A run's metrics: appended to `folder`/metrics.jsonl and TensorBoard scalars
    (`folder`/tb, tag train/<key>), by process 0 only, the one writer across hosts; on the
    other processes every call is a no-op."""

    def __init__(self, folder: Path):
        writer = Writer()
        self.main = writer.main
        self._files = contextlib.ExitStack()
        self.jsonl = self._files.enter_context(writer.appending(Path(folder) / "metrics.jsonl"))
        if self.main:
            # lazy: tensorboardX imports torch when it is installed (seconds, every command)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(folder) / "tb"))
        else:
            self.tb = None

    def write(self, rec: dict) -> None:
        """One record {'step': int, name: number, ...}, flushed."""
        if not self.main:
            return
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for k, v in rec.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.main:
            self.tb.close()
        self._files.close()


def pad_batch_rows(batch: Batch, n: int) -> Batch:
    """Append `n` rows that carry no loss (k_mask 0, all positions valid), so a batch size
    the mesh's data x fsdp does not divide still shards; the gradient is unchanged."""
    if n == 0:
        return batch

    def pad(name, a):
        fill = (np.ones if "valid" in name else np.zeros)((n, *a.shape[1:]), a.dtype)
        return np.concatenate([a, fill])

    return _map_fields(pad, batch)


def stack_micro(batches: list[Batch]) -> Batch:
    """[accum, micro, time] arrays, each field padded in time to its longest micro-batch."""
    def stack(name, _):
        parts = [getattr(b, name) for b in batches]
        t = max(a.shape[1] for a in parts)
        return np.stack([np.pad(a, ((0, 0), (0, t - a.shape[1]))) for a in parts])

    return _map_fields(stack, batches[0])


def _map_fields(fn, batch: Batch) -> Batch:
    """`fn(name, array)` on each present field (name-aware, unlike jax.tree.map)."""
    return dataclasses.replace(batch, **{f.name: fn(f.name, getattr(batch, f.name))
                                         for f in dataclasses.fields(batch)
                                         if getattr(batch, f.name) is not None})


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def fit(arch: ArchConfig, base: Params, data, cfg: TrainConfig, mesh, out_dir: Path, *,
        pad_id: int, max_steps: int = 0, dtype: str = "float32", remat: str = "none",
        teacher: Params | None = None, data_sha256: str | None = None, log=print) -> dict:
    """Train on tokenised `data` (sjax.data.sft.Tokenized), resuming from `out_dir` if it
    holds checkpoints of the same run (model, data file `data_sha256`, hyper-parameters).
    Distillation (`cfg.loss == 'distill'`) needs `data` tokenised with a teacher view; the
    teacher is `teacher` or else the base model. A non-finite loss, gradient norm or params
    stops the run before it can be checkpointed. Returns final state, metrics history and
    timing."""
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
    if cfg.loss == "distill" and data.teacher_ids is None:
        raise SjaxError("train.loss=distill: the dataset has no teacher view (tokenise it "
                        "with a teacher system prompt)")
    out_dir = Path(out_dir)
    ckpt = Checkpoints(out_dir / "checkpoints", fingerprint(arch, cfg, total, data_sha256),
                       cfg.ckpt_every, cfg.keep)
    state, frozen = init_state(arch, base, cfg, mesh, tx, teacher)
    spec = StepSpec(arch, cfg.mode, cfg.lora_alpha / cfg.lora_rank, cfg.vocab_chunk, dtype,
                    remat, cfg.loss)
    step_fn = compile_step(state, frozen, spec, tx, sched, mesh)
    start = ckpt.latest() or 0
    if start:
        state = ckpt.restore(start, state)
        log(f"resumed from step {start} in {ckpt.folder}")
    main = distributed.is_main()
    metrics_log = MetricsLog(out_dir)
    peak, peak_source = device_peak(dtype)
    history, last_good = [], start

    def diverged(step, what):
        where = (f"the last good checkpoint is step {last_good} in {ckpt.folder}" if last_good
                 else f"no checkpoint was written to {ckpt.folder}")
        return SjaxError(f"training diverged at step {step} ({what}); stopped, {where}")

    micro_sh = sharding.batch_sharding(mesh, 3, axis=1)
    extra_rows = -cfg.batch_size % sharding.batch_shards(mesh)

    def micro_batches(step):
        epoch, k = divmod(step, steps_per_epoch)
        it = epoch_batches(data, cfg.batch_size, cfg.seed, epoch, pad_id,
                           start=k * cfg.grad_accum)
        return [pad_batch_rows(next(it), extra_rows) for _ in range(cfg.grad_accum)]

    try:
        with tqdm(total=total, initial=start, desc="train", unit="step", disable=not main) as bar:
            for step in range(start, total):
                host = stack_micro(micro_batches(step))
                batch = jax.tree.map(lambda v: sharding.global_array(v, micro_sh), host)
                t0 = time.perf_counter()
                state, m = step_fn(state, frozen, batch)
                m = jax.tree.map(sharding.to_host, m)
                dt = time.perf_counter() - t0
                loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise diverged(step + 1, f"loss {loss}, gradient norm {grad_norm}")
                # real tokens only: neither right padding nor the mesh-padding rows
                lengths = host.valid_bt[:, :cfg.batch_size].sum(-1).ravel()
                flops = train_flops(arch, lengths, cfg.mode)
                if cfg.loss == "distill":  # the teacher's forward: 2 x params per token
                    flops += 2 * matmul_params(arch) * host.t_valid_bt[:, :cfg.batch_size].sum()
                rec = {"step": step + 1, "loss": loss, "grad_norm": grad_norm,
                       "lr": float(m["lr"]), "trained_tokens": float(m["tokens"]),
                       "tokens_per_s": float(lengths.sum()) / dt, "step_s": dt,
                       "mfu": mfu(flops, dt, peak, mesh.size)}
                history.append(rec)
                if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                    metrics_log.write(rec)
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == total:
                    if not sharding.to_host(_all_finite(state["params"])):
                        raise diverged(step + 1, "non-finite params after the update")
                    ckpt.save(step + 1, state, force=step + 1 == total)
                    last_good = step + 1
    finally:
        ckpt.close()
        metrics_log.close()
    return {"state": state, "frozen": frozen, "history": history, "total_steps": total,
            "peak_flops": peak, "peak_source": peak_source}
