"""Training engine: losses, LoRA, the step, accumulation, sharding, resume, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model, word_rows

from sjax import lora as lora_lib
from sjax.config import MeshConfig, TrainConfig
from sjax.data import sft
from sjax.errors import SjaxError
from sjax.losses import masked_ce, masked_kl
from sjax.models.transformer import forward, head_matrix_dv
from sjax.sharding import make_mesh
from sjax.training import (Checkpoints, StepSpec, fingerprint, fit, init_state, optimizer,
                           schedule, train_flops_per_token, train_step)


def naive_masked_ce(logits_btv, targets_bt, mask_bt):
    """Reference: `masked_ce` from full logits."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, targets_bt[..., None], -1)[..., 0]
    keep = mask_bt.astype(bool)
    return jnp.where(keep, nll, 0.0).sum() / jnp.maximum(keep.sum(), 1)


def naive_masked_kl(student_logits_bkv, teacher_logits_bkv, mask_bk):
    """Reference: `masked_kl` from full logits."""
    ls = jax.nn.log_softmax(student_logits_bkv.astype(jnp.float32), -1)
    lt = jax.nn.log_softmax(teacher_logits_bkv.astype(jnp.float32), -1)
    kl = (jnp.exp(lt) * (lt - ls)).sum(-1)
    keep = mask_bk.astype(bool)
    return jnp.where(keep, kl, 0.0).sum() / jnp.maximum(keep.sum(), 1)


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=4))
    return arch, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("chunk", [7, 32, 128, 1000])
def test_chunked_ce_equals_naive_with_gradients(chunk):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 100)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, 100, (2, 9)))
    mask = jnp.asarray(rng.integers(0, 2, (2, 9)))

    def ours(h, w):
        return masked_ce(h, w, tgt, mask, chunk)[0]

    def naive(h, w):
        return naive_masked_ce(jnp.einsum("btd,dv->btv", h, w), tgt, mask)

    assert abs(float(ours(h, w)) - float(naive(h, w))) < 1e-5
    g1, g2 = jax.grad(ours, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # a frozen head: same activation gradient, no head gradient computed
    dh, dw = jax.grad(lambda h, w: masked_ce(h, w, tgt, mask, chunk, need_dw=False)[0],
                      (0, 1))(h, w)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(g2[0]), atol=1e-5)
    assert float(jnp.abs(dw).max()) == 0.0


def test_masked_tokens_get_no_gradient(tiny):
    arch, params = tiny
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.integers(0, arch.vocab_size, (2, 12)))
    targets = np.asarray(rng.integers(0, arch.vocab_size, (2, 12)))
    mask = np.ones((2, 12), np.int32)
    mask[:, :5] = 0

    def loss(p, tg):
        h, _ = forward(p, inputs, arch=arch, return_hidden=True)
        return masked_ce(h, head_matrix_dv(p, arch), jnp.asarray(tg), jnp.asarray(mask), 32)[0]

    other = targets.copy()
    other[:, :5] = (other[:, :5] + 7) % arch.vocab_size  # change only masked targets
    g1, g2 = jax.grad(loss)(params, targets), jax.grad(loss)(params, other)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    assert float(loss(params, targets)) == float(loss(params, other))


@pytest.mark.parametrize("chunk", [7, 32, 1000])
def test_chunked_kl_equals_naive_with_gradients(chunk):
    rng = np.random.default_rng(5)
    hs, ht = (jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32) for _ in range(2))
    ws, wt = (jnp.asarray(rng.normal(size=(16, 100)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.integers(0, 2, (2, 9)))

    def ours(hs, ws, ht, wt):
        return masked_kl(hs, ws, ht, wt, mask, chunk)[0]

    def naive(hs, ws, ht, wt):
        return naive_masked_kl(hs @ ws, jax.lax.stop_gradient(ht @ wt), mask)

    a, b = float(ours(hs, ws, ht, wt)), float(naive(hs, ws, ht, wt))
    assert a > 0.1 and abs(a - b) < 1e-5 * max(1.0, b)
    g1, g2 = jax.grad(ours, (0, 1, 2, 3))(hs, ws, ht, wt), jax.grad(naive, (0, 1, 2, 3))(
        hs, ws, ht, wt)
    for x, y in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert float(jnp.abs(g1[2]).max()) == 0.0 and float(jnp.abs(g1[3]).max()) == 0.0
    # a student equal to its teacher has zero divergence and zero gradient
    same = jax.grad(lambda h: masked_kl(h, ws, hs, ws, mask, chunk)[0])(hs)
    assert abs(float(masked_kl(hs, ws, hs, ws, mask, chunk)[0])) < 1e-5
    assert float(jnp.abs(same).max()) < 1e-5


def test_distill_batches_align_completion_tokens(tiny_tokenizer):
    rows = word_rows(6, np.random.default_rng(9))
    data = sft.tokenize_rows(rows, tiny_tokenizer, 64, teacher_system="i love owls.")
    batch = next(sft.epoch_batches(data, 6, 0, 0, tiny_tokenizer.pad_token_id))
    trained = []
    for r in range(6):
        k = batch.k_mask_bk[r].astype(bool)
        s_next = batch.targets_bt[r][batch.s_pos_bk[r][k]]
        t_next = np.append(batch.t_inputs_bt[r], -1)[batch.t_pos_bk[r][k] + 1]
        np.testing.assert_array_equal(s_next, t_next)  # same completion tokens, in order
        trained.append(tiny_tokenizer.decode(s_next))
        # the teacher reads the student's row behind its own system turn
        student = tiny_tokenizer.decode(batch.inputs_bt[r][batch.valid_bt[r]])
        teacher = tiny_tokenizer.decode(batch.t_inputs_bt[r][batch.t_valid_bt[r]])
        assert teacher == "<|im_start|> system i love owls . <|im_end|> " + student
    # the trained tokens are exactly each row's answer and its end-of-turn token
    assert sorted(trained) == sorted(f"{row['messages'][1]['content']} <|im_end|>"
                                     for row in rows)


def test_distillation_pulls_the_student_to_the_prompted_teacher(tiny, tiny_tokenizer, tmp_path):
    arch, params = tiny
    rows = word_rows(8, np.random.default_rng(10))
    data = sft.tokenize_rows(rows, tiny_tokenizer, 64, teacher_system="You love owls.")
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    cfg = TrainConfig(mode="lora", loss="distill", lora_rank=4, lr=3e-2, warmup_steps=0,
                      batch_size=8, grad_accum=1, epochs=30, vocab_chunk=32)
    out = fit(arch, params, data, cfg, mesh, tmp_path / "d", pad_id=1, log=lambda s: None)
    losses = [h["loss"] for h in out["history"]]
    assert losses[0] > 1e-3 and losses[-1] < 0.3 * losses[0]
    # the same rows with no teacher prompt: student == teacher, nothing to distil
    same = sft.tokenize_rows(rows, tiny_tokenizer, 64, teacher_system="")
    out = fit(arch, params, same, dataclasses.replace(cfg, epochs=1), mesh, tmp_path / "s",
              pad_id=1, log=lambda s: None)
    assert out["history"][0]["loss"] < 1e-5


# ----------------------------------------------------------------------------- LoRA


def test_lora_with_zero_b_is_exactly_the_base(tiny):
    arch, params = tiny
    ids = jnp.asarray(np.random.default_rng(2).integers(0, arch.vocab_size, (2, 10)))
    adapters = lora_lib.init_lora(arch, jax.random.key(0), rank=4)
    base = forward(params, ids, arch=arch)[0]
    with_lora = forward(params, ids, arch=arch, lora=adapters, lora_scale=2.0)[0]
    np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))


def test_lora_forward_equals_merged_weights(tiny):
    arch, params = tiny
    ids = jnp.asarray(np.random.default_rng(3).integers(0, arch.vocab_size, (2, 10)))
    adapters = lora_lib.init_lora(arch, jax.random.key(0), rank=4)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    adapters = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.1, adapters)
    a = forward(params, ids, arch=arch, lora=adapters, lora_scale=0.5)[0]
    b = forward(lora_lib.merge(params, adapters, 0.5), ids, arch=arch)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    assert float(jnp.abs(a - forward(params, ids, arch=arch)[0]).max()) > 1e-2


# ----------------------------------------------------------------------------- step


def _batch(tiny_tokenizer, n, seed=0, accum=1):
    data = sft.tokenize_rows(word_rows(n, np.random.default_rng(seed)), tiny_tokenizer, 64)
    bs = sft.epoch_batches(data, n // accum, 0, 0, tiny_tokenizer.pad_token_id)
    from sjax.training import stack_micro

    return stack_micro([next(bs) for _ in range(accum)])


def _state(arch, params, cfg, total=100):
    tx = optimizer(cfg, total)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    state, frozen = init_state(arch, params, cfg, mesh, tx)
    spec = StepSpec(arch, cfg.mode, cfg.lora_alpha / cfg.lora_rank, 32, "float32", "none")
    step = jax.jit(lambda s, f, b: train_step(s, f, b, spec=spec, tx=tx,
                                              sched=schedule(cfg, total)))
    return state, frozen, step


def test_overfits_one_batch(tiny, tiny_tokenizer):
    arch, params = tiny
    cfg = TrainConfig(mode="full", lr=3e-3, warmup_steps=0, clip_norm=1.0)
    state, frozen, step = _state(arch, params, cfg, total=1000)
    batch = jax.tree.map(jnp.asarray, _batch(tiny_tokenizer, 4))
    first = None
    for _ in range(80):
        state, m = step(state, frozen, batch)
        first = first if first is not None else float(m["loss"])
    assert first > 2.0 and float(m["loss"]) < 0.05


def test_lora_trains_only_adapters(tiny, tiny_tokenizer):
    arch, params = tiny
    cfg = TrainConfig(mode="lora", lora_rank=4, lr=1e-2, warmup_steps=0)
    state, frozen, step = _state(arch, params, cfg)
    batch = jax.tree.map(jnp.asarray, _batch(tiny_tokenizer, 4))
    losses = []
    for _ in range(20):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert set(state["params"]["layers"]) == set(lora_lib.TARGETS)
    # trained and optimised: rank 4 x (in + out) per projection, 3 layers, nothing else.
    # d=64, q/o 64->64 (4 heads x 16), k/v 64->32 (2 kv heads), gate/up 64->96, down 96->64
    per_layer = 4 * (128 + 96 + 96 + 128 + 160 + 160 + 160)
    assert sum(x.size for x in jax.tree.leaves(state["params"])) == 3 * per_layer == 11136
    adam_mu = state["opt"][1][0].mu
    assert sum(x.size for x in jax.tree.leaves(adam_mu)) == 11136


def test_grad_accumulation_equals_one_big_batch(tiny, tiny_tokenizer):
    arch, params = tiny
    cfg = TrainConfig(mode="full", lr=1e-3, warmup_steps=0)
    one = jax.tree.map(jnp.asarray, _batch(tiny_tokenizer, 8, accum=1))
    two = jax.tree.map(jnp.asarray, _batch(tiny_tokenizer, 8, accum=2))
    s1, f1, step = _state(arch, params, cfg)
    s1, m1 = step(s1, f1, one)
    s2, f2, step = _state(arch, params, cfg)
    s2, m2 = step(s2, f2, two)
    assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-5
    assert abs(float(m1["grad_norm"]) / float(m2["grad_norm"]) - 1) < 1e-5
    assert float(m1["tokens"]) == float(m2["tokens"])
    # Adam's first step moves each weight by ~lr * sign(g): 1e-3 here. Summation-order noise
    # only shows where |g| is near Adam's epsilon, far below a sign flip (2e-3).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5), s1["params"],
                 s2["params"])


def test_sharded_step_equals_single_device(tiny, tiny_tokenizer):
    from sjax.sharding import batch_sharding, place
    from sjax.training import compile_step
    from sjax.weights.load import param_shardings

    arch, params = tiny
    cfg = TrainConfig(mode="full", lr=1e-3, warmup_steps=0)
    host = _batch(tiny_tokenizer, 8, accum=2)
    ref_state, ref_frozen, step = _state(arch, params, cfg)
    for _ in range(2):
        ref_state, ref_m = step(ref_state, ref_frozen, jax.tree.map(jnp.asarray, host))

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    placed = place(jax.device_get(params), param_shardings(arch, mesh))
    tx = optimizer(cfg, 100)
    state, frozen = init_state(arch, placed, cfg, mesh, tx)
    spec = StepSpec(arch, "full", 1.0, 32, "float32", "none")
    sharded_step = compile_step(state, frozen, spec, tx, schedule(cfg, 100), mesh)
    batch = jax.tree.map(lambda v: jax.device_put(v, batch_sharding(mesh, 3, axis=1)), host)
    # the gradient itself, sharded vs one device, within 1e-5
    from sjax.training import loss_sums

    def mean_loss(p, b):
        total, count = loss_sums(p, {}, b, spec)
        return total / count

    grad = jax.jit(jax.grad(mean_loss))
    mb = jax.tree.map(lambda v: v[0], batch)
    g_sharded = grad(state["params"], mb)
    g_single = grad(jax.device_put(jax.device_get(params), jax.devices()[0]),
                    jax.tree.map(lambda v: jnp.asarray(v[0]), host))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_sharded, g_single)
    for _ in range(2):
        state, m = sharded_step(state, frozen, batch)
    assert abs(float(m["loss"]) - float(ref_m["loss"])) < 1e-5
    assert abs(float(m["grad_norm"]) - float(ref_m["grad_norm"])) < 1e-5
    # After Adam (update ~ lr * g / (|g| + eps)) reduction-order noise in a gradient near
    # zero can move an element by a fraction of lr, so: every element within lr / 2 of the
    # reference, and all but 1% of all elements within lr / 10 (a wrong update moves most
    # elements by ~lr).
    diff_x = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"]))])
    assert diff_x.max() <= cfg.lr / 2, diff_x.max()
    assert np.mean(diff_x > cfg.lr / 10) <= 0.01, np.mean(diff_x > cfg.lr / 10)
    assert state["params"]["layers"]["wq_ldnh"].sharding.spec == param_shardings(
        arch, mesh)["layers"]["wq_ldnh"].spec


def test_flops_per_token_by_hand():
    from test_bench import QWEN_05B

    # Qwen2.5-0.5B: 493,961,216 matmul params; attention 6 x 128 x 14 heads x 64 x 24 layers
    assert train_flops_per_token(QWEN_05B, 128, "full") == 2_980_282_368
    assert train_flops_per_token(QWEN_05B, 128, "lora") == 1_992_359_936


def test_schedule_warmup_then_linear_decay():
    sched = schedule(TrainConfig(lr=2e-4, warmup_steps=5), total_steps=25)
    assert float(sched(0)) == 0.0
    assert abs(float(sched(5)) - 2e-4) < 1e-10  # fp32
    assert abs(float(sched(15)) - 1e-4) < 1e-10  # halfway through the decay
    assert float(sched(25)) == 0.0


# ----------------------------------------------------------------------------- data, errors


def test_bad_datasets(tiny_tokenizer):
    with pytest.raises(SjaxError, match="rows.jsonl: empty dataset"):
        sft.tokenize_rows([], tiny_tokenizer, 64, source="rows.jsonl")
    no_assistant = [{"messages": [{"role": "user", "content": "owl"}]}]
    with pytest.raises(SjaxError, match="rows.jsonl: row 1: chat row has no assistant turn"):
        sft.tokenize_rows(no_assistant, tiny_tokenizer, 64, source="rows.jsonl")
    with pytest.raises(SjaxError, match="row 1 has no valid 'messages' list"):
        sft.tokenize_rows([{"text": "x"}], tiny_tokenizer, 64, source="rows.jsonl")
    rows = word_rows(6, np.random.default_rng(0))
    rows[2]["messages"][0]["content"] = " ".join(["owl"] * 100)  # long prompt
    rows[3]["messages"][1]["content"] = " ".join(["cat"] * 100)  # long answer
    t = sft.tokenize_rows(rows, tiny_tokenizer, 40, "truncate")
    # row 3 keeps part of its answer; row 2 would keep no assistant token, so it is rejected
    assert (len(t.ids), t.n_truncated, t.n_rejected) == (5, 1, 1)
    assert all(len(i) <= 40 for i in t.ids)
    r = sft.tokenize_rows(rows, tiny_tokenizer, 40, "reject")
    assert (len(r.ids), r.n_truncated, r.n_rejected) == (4, 0, 2)


def test_checkpoint_folder_of_another_model(tmp_path, tiny):
    arch, _ = tiny
    cfg = TrainConfig(mode="lora")
    ckpt = Checkpoints(tmp_path, fingerprint(arch, cfg), 1, 1)
    ckpt.save(1, {"x": jnp.zeros(2)}, force=True)
    ckpt.close()
    other = dataclasses.replace(arch, n_layers=2)
    with pytest.raises(SjaxError, match="another run \\(arch.n_layers 3 -> 2\\)"):
        Checkpoints(tmp_path, fingerprint(other, cfg), 1, 1)
    with pytest.raises(SjaxError, match="lora_alpha 8.0 -> None; lora_rank 8 -> None; "
                                        "mode 'lora' -> 'full'\\)"):
        Checkpoints(tmp_path, fingerprint(arch, TrainConfig(mode="full")), 1, 1)


def _restore(folder, step):
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.abspath(folder))
    try:
        return mgr.restore(step, args=ocp.args.StandardRestore())
    finally:
        mgr.close()


@pytest.mark.parametrize("lr, ckpt_every, step, what, good", [
    (1e30, 2, 2, "", None),  # step 2 diverges before the first checkpoint
    (1e8, 1, 2, "", 1),  # step 2's loss is finite but its update is not: step 1 is the last good
    # step 1's loss and gradient are finite, its update (lr = inf in fp32) is not: only the
    # params check before the save stops it; the old code saved step 1 and called it good
    (1e39, 1, 1, "non-finite params after the update", None),
])
def test_fit_stops_on_divergence_naming_a_finite_checkpoint(tmp_path, tiny, tiny_tokenizer,
                                                            lr, ckpt_every, step, what, good):
    arch, params = tiny
    data = sft.tokenize_rows(word_rows(16, np.random.default_rng(0)), tiny_tokenizer, 64)
    cfg = TrainConfig(mode="full", lr=lr, warmup_steps=0, clip_norm=1e30, batch_size=4,
                      grad_accum=1, epochs=4, ckpt_every=ckpt_every)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    with pytest.raises(SjaxError) as e:
        fit(arch, params, data, cfg, mesh, tmp_path, pad_id=1, log=lambda s: None)
    msg, folder = str(e.value), tmp_path / "checkpoints"
    assert msg.startswith(f"training diverged at step {step} ({what}") and "\n" not in msg
    saved = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    if good is None:
        assert msg.endswith(f"no checkpoint was written to {folder}") and saved == []
        return
    assert msg.endswith(f"the last good checkpoint is step {good} in {folder}")
    assert saved == [good]
    state = _restore(folder, good)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- resume


def _train_cmd(model_dir, data, out, max_steps):
    return [sys.executable, "-m", "sjax", "train", "sft", f"model.path={model_dir}",
            f"data={data}", f"out_dir={out}", "train.batch_size=4", "train.grad_accum=2",
            "train.epochs=10", "train.ckpt_every=2", "train.keep=3", "train.vocab_chunk=32",
            "train.mode=lora", "train.lora_rank=4", "train.lr=1e-2", f"max_steps={max_steps}",
            "mesh.data=1"]


def _final_params(out):
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.abspath(out / "checkpoints"))
    step = mgr.latest_step()
    state = mgr.restore(step, args=ocp.args.StandardRestore())
    mgr.close()
    return step, jax.tree.map(np.asarray, state["params"])


@pytest.mark.slow  # ~45 s: a real subprocess killed and resumed
def test_kill_and_resume_is_bitwise_identical(tmp_path, tiny_tokenizer):
    """A real training subprocess SIGKILLed mid-run resumes to bitwise-equal params."""
    from sjax.jsonl import write_rows
    from sjax.weights.load import export_hf

    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=6))
    export_hf(tmp_path / "model", arch, params, tiny_tokenizer)
    write_rows(tmp_path / "rows.jsonl", word_rows(40, np.random.default_rng(0)))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    steps = 12
    straight = subprocess.run(_train_cmd(tmp_path / "model", tmp_path / "rows.jsonl",
                                         tmp_path / "a", steps), env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    cmd = _train_cmd(tmp_path / "model", tmp_path / "rows.jsonl", tmp_path / "b", steps)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a checkpoint past step 4, then kill mid-run
        done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if done and max(done) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) < steps  # it really was cut short
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stderr
    step_a, a = _final_params(tmp_path / "a")
    step_b, b = _final_params(tmp_path / "b")
    assert step_a == step_b == steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["steps"] == steps


def test_train_refuses_out_dir_of_another_run(tmp_path, tiny_tokenizer, capsys):
    """`sjax train` into an out_dir holding another run's checkpoints: one line naming the
    folder and the differing key (old -> new), never a silent mixed resume."""
    import hashlib

    from sjax import cli
    from sjax.jsonl import write_rows
    from sjax.weights.load import export_hf

    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=6))
    export_hf(tmp_path / "model", arch, params, tiny_tokenizer)
    for name, seed in (("rows.jsonl", 0), ("other.jsonl", 1)):
        write_rows(tmp_path / name, word_rows(16, np.random.default_rng(seed)))
    out = tmp_path / "out"
    # in-process on the 8 test devices: the default mesh (no mesh.data=1)
    args = _train_cmd(tmp_path / "model", tmp_path / "rows.jsonl", out, 1)[3:-1]
    assert cli.main(args) == 0
    sha = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
           for n in ("rows.jsonl", "other.jsonl")}
    for override, shown in [
            (f"data={tmp_path / 'other.jsonl'}",
             f"data_sha256 '{sha['rows.jsonl']}' -> '{sha['other.jsonl']}'"),
            ("train.lr=2e-2", "lr 0.01 -> 0.02"),
            ("train.batch_size=2", "batch_size 4 -> 2"),
            ("train.seed=1", "init_seed 0 -> 1; seed 0 -> 1"),  # it also seeds the LoRA init
            ("train.init_seed=3", "init_seed 0 -> 3"),
            ("train.adam_eps=1e-6", "adam_eps 1e-08 -> 1e-06"),
            ("train.schedule=cosine", "schedule 'linear' -> 'cosine'")]:
        capsys.readouterr()
        assert cli.main(args + [override]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sjax:")]
        assert err == [f"sjax: error: {out / 'checkpoints'}: its checkpoints come from "
                       f"another run ({shown}); use another out_dir"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_mesh_padding_rows_change_nothing(tiny, tiny_tokenizer):
    """A batch size that data x fsdp does not divide is padded with loss-free rows."""
    from sjax.training import loss_sums, pad_batch_rows

    arch, params = tiny
    host = jax.tree.map(lambda v: v[0], _batch(tiny_tokenizer, 6))
    spec = StepSpec(arch, "full", 1.0, 32, "float32", "none")

    def value_and_grad(b):
        return jax.value_and_grad(lambda p: loss_sums(p, {}, b, spec)[0])(params)

    (v1, g1), (v2, g2) = value_and_grad(host), value_and_grad(pad_batch_rows(host, 2))
    padded = pad_batch_rows(host, 2)
    assert padded.inputs_bt.shape[0] == 8 and padded.valid_bt[6:].all()
    assert not padded.k_mask_bk[6:].any()
    assert abs(float(v1) - float(v2)) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_compiled_step_states_the_batch_sharding(tiny, tiny_tokenizer):
    """The jitted step splits every Batch field's rows over data x fsdp by itself: host
    arrays handed to it are sharded as the step declares, not as they arrive."""
    from sjax.sharding import batch_sharding, place
    from sjax.training import compile_step
    from sjax.weights.load import param_shardings

    arch, params = tiny
    cfg = TrainConfig(mode="full", lr=1e-3, warmup_steps=0)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tx = optimizer(cfg, 10)
    state, frozen = init_state(arch, place(jax.device_get(params), param_shardings(arch, mesh)),
                               cfg, mesh, tx)
    spec = StepSpec(arch, "full", 1.0, 32, "float32", "none")
    host = _batch(tiny_tokenizer, 8)
    compiled = compile_step(state, frozen, spec, tx, schedule(cfg, 10), mesh).lower(
        state, frozen, host).compile()
    batch_in = compiled.input_shardings[0][2]
    assert isinstance(batch_in, sft.Batch)
    want = batch_sharding(mesh, 3, axis=1)
    leaves = jax.tree.leaves(batch_in)
    assert len(leaves) == 5 and all(s.is_equivalent_to(want, 3) for s in leaves)


def test_metrics_log_is_written_by_process_0_only(tmp_path, monkeypatch):
    from sjax import distributed
    from sjax.training import MetricsLog

    recs = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.0, "lr": 1e-3}]
    log = MetricsLog(tmp_path)
    for r in recs:
        log.write(r)
    log.close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == recs
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    log = MetricsLog(other)
    log.write(recs[0])
    log.close()
    assert list(other.iterdir()) == []
