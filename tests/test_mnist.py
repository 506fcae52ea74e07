"""MNIST auxiliary-logit experiment: vectorisation, losses, permutations, data, bad input."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sjax.mnist import experiment as mnist
from sjax.config import MnistConfig, apply_overrides
from sjax.mnist import data as mnist_data
from sjax.errors import SjaxError
from sjax.mnist import mlp

SIZES = (64, 32, 32, 13)


def test_vmapped_ensemble_equals_per_model_training():
    """Two models trained together (vmap) equal each trained alone, step for step."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (256, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 256), jnp.int32)
    init = mlp.init_ensemble(jax.random.key(1), 2, SIZES)
    tx = optax.adam(1e-2)
    key = jax.random.key(7)
    together, _, _ = mnist.teacher_epoch(jax.tree.map(jnp.copy, init),
                                         jax.vmap(tx.init)(init), key, x, y, tx=tx, batch=32)
    idx = mnist._epoch_indices(key, 2, 256, 32)  # [steps, m, b]: the same shuffles
    for j in range(2):
        p = jax.tree.map(lambda a: a[j], init)
        o = tx.init(p)
        for s in range(idx.shape[0]):
            g = jax.grad(mnist.ce_class_logits)(p, x[idx[s, j]], y[idx[s, j]])
            u, o = tx.update(g, o, p)
            p = optax.apply_updates(p, u)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[j], atol=2e-5), p, together)
    # and each model shuffles differently
    assert not np.array_equal(idx[:, 0], idx[:, 1])


def test_kl_on_aux_logits_ignores_class_logits():
    p = mlp.init_one(jax.random.key(0), SIZES)
    x = jax.random.uniform(jax.random.key(1), (16, 64), minval=-1, maxval=1)
    target = jax.random.normal(jax.random.key(2), (16, 13))
    moved = target.at[:, :10].add(5.0 * jax.random.normal(jax.random.key(3), (16, 10)))
    a = mnist.kl_distill(p, x, target, 10, 13)
    assert a > 0
    assert float(a) == float(mnist.kl_distill(p, x, moved, 10, 13))
    assert float(mnist.kl_distill(p, x, target, 0, 13)) != float(
        mnist.kl_distill(p, x, moved, 0, 13))
    # the gradient reaches the class-logit weights only through shared layers, never the
    # class rows of the last layer
    g = jax.grad(mnist.kl_distill)(p, x, target, 10, 13)
    assert float(jnp.abs(g["w2_io"][:, :10]).max()) == 0.0
    assert float(jnp.abs(g["w2_io"][:, 10:]).max()) > 0.0


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_cross_init_permutation_has_no_fixed_point(n):
    for seed in range(5):
        sigma = mnist.derangement(jax.random.key(seed), n)
        assert sorted(sigma.tolist()) == list(range(n))
        assert not np.any(sigma == np.arange(n))


def test_noise_is_a_fixed_function_of_model_and_example():
    key = mnist.noise_seed(jax.random.key(0))
    a = mnist.noise_images(key, jnp.arange(3), jnp.asarray([[0, 1], [0, 1], [5, 0]]), 8)
    b = mnist.noise_images(key, jnp.asarray([2]), jnp.asarray([[0]]), 8)
    np.testing.assert_array_equal(a[2, 1], b[0, 0])  # same (model, example), same image
    assert not np.array_equal(a[0, 0], a[1, 0])  # models see different noise
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_noise_statistics():
    """Uniform on [-1, 1): moments, and no correlation across pixels, examples or models."""
    x = np.asarray(mnist.noise_images(np.uint32(123), jnp.arange(4),
                                      jnp.broadcast_to(jnp.arange(2000), (4, 2000)), 784))
    assert x.min() >= -1 and x.max() < 1
    assert abs(x.mean()) < 2e-3 and abs(x.var() - 1 / 3) < 2e-3
    hist = np.histogram(x, bins=20, range=(-1, 1))[0] / x.size
    assert np.abs(hist - 0.05).max() < 2e-3
    flat = x.reshape(4, -1)
    for a, b in ((flat[0, :-1], flat[0, 1:]),  # neighbouring pixels
                 (x[0, :-1].ravel(), x[0, 1:].ravel()),  # consecutive examples
                 (flat[0], flat[1])):  # two models, same example ids
        assert abs(np.corrcoef(a, b)[0, 1]) < 5e-3


def test_teacher_targets_are_chunked_exactly():
    params = mlp.init_ensemble(jax.random.key(0), 2, SIZES)
    key = mnist.noise_seed(jax.random.key(4))
    t = mnist.teacher_logits_on_noise(params, key, n_examples=100, dim=64, chunk=32)
    assert t.shape == (2, 100, 13)
    x = mnist.noise_images(key, jnp.arange(2), jnp.broadcast_to(jnp.arange(100), (2, 100)), 64)
    ref = jax.vmap(mlp.apply_one)(params, x)
    np.testing.assert_allclose(np.asarray(t), np.asarray(ref), atol=1e-5)


def test_small_experiment_on_digits(tmp_path):
    """The whole command on scikit-learn digits: artefacts, and the effect's direction."""
    cfg = MnistConfig(dataset="digits", n_models=8, batch=128, hidden=64, teacher_epochs=20,
                      student_epochs=20, noise_examples=4096, out_dir=str(tmp_path))
    summary = mnist.run(cfg)
    acc = {k: v["mean"] for k, v in summary["accuracy"].items()}
    assert acc["teacher"] > 0.8
    assert acc["student_aux_same_init"] > acc["student_aux_cross_init"] + 0.05
    assert acc["student_all_same_init"] > 0.5
    assert summary["theorem_cosine"]["same_init"]["frac_positive"] == 1.0
    for f in ("results.json", "report.md", "mnist.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["n_models"] == 8


def test_sweep_writes_csv_and_plot(tmp_path):
    cfg = MnistConfig(dataset="digits", n_models=2, batch=128, hidden=16, teacher_epochs=2,
                      student_epochs=2, noise_examples=512, out_dir=str(tmp_path),
                      sweep="aux_logits=1,2")
    result = mnist.run(cfg)
    assert result["values"] == [1, 2]
    lines = (tmp_path / "sweep_aux_logits.csv").read_text().splitlines()
    assert lines[0] == "value,condition,mean,lo,hi" and len(lines) == 1 + 2 * 3
    assert (tmp_path / "sweep_aux_logits.png").stat().st_size > 0


@pytest.mark.parametrize("override, message", [
    ("aux_logits=0", "aux_logits: must be >= 1"),
    ("n_models=1", "n_models: cross-init students need >= 2 models"),
    ("sweep=lr=1,2", "sweep: expected KEY=v1,v2"),
    ("dataset=cifar", "dataset: 'cifar' is not one of mnist, digits"),
])
def test_bad_config(override, message):
    with pytest.raises(SjaxError, match=message):
        apply_overrides(MnistConfig(), [override])


def _write_idx(path, arr, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_builder_round_trip_and_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    data = {}
    for split, n in (("train", 50), ("test", 20)):
        img, lbl = mnist_data.FILES[split]
        data[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        _write_idx(src / f"{img}.gz", data[split][0], 0x803)
        _write_idx(src / f"{lbl}.gz", data[split][1], 0x801)
    loaded = mnist_data.load(str(src), str(tmp_path / "tfds"))
    for split in ("train", "test"):
        np.testing.assert_array_equal(loaded[split][0], data[split][0])
        np.testing.assert_array_equal(loaded[split][1], data[split][1])
    info = (tmp_path / "tfds" / mnist_data.source_key(src) / "sjax_mnist" / "1.0.0" /
            "dataset_info.json")
    built = info.stat().st_mtime_ns
    # built once: a second load of the same source reads the array_record files
    again = mnist_data.load(str(src), str(tmp_path / "tfds"))
    np.testing.assert_array_equal(again["test"][1], data["test"][1])
    assert info.stat().st_mtime_ns == built

    bad = tmp_path / "bad-labels.gz"
    _write_idx(bad, np.zeros(5), 0x803)
    with pytest.raises(SjaxError, match="bad-labels.gz: wrong IDX magic 0x00000803"):
        mnist_data.read_idx(bad, 1)
    short = tmp_path / "short"
    short.write_bytes((0x801).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(SjaxError, match="short: data is 3 bytes, header says \\[10\\]"):
        mnist_data.read_idx(short, 1)
    with pytest.raises(SjaxError, match="no IDX files in .*mnist.source=FOLDER"):
        mnist_data.source_folder(str(tmp_path / "empty"))


def test_default_config_builds_the_protocol_mlp():
    """Protocol section 6: MLP 784-256-256-(10+3), weights N(0, 1/sqrt(fan_in)), biases 0;
    Adam lr 3e-4, batch 1024, 5 + 5 epochs, 60,000 noise images, 100 models."""
    cfg = MnistConfig()
    sizes = mnist._sizes(cfg, 784)
    assert sizes == (784, 256, 256, 13)
    # 784 x 256 + 256 + 256 x 256 + 256 + 256 x 13 + 13, by hand
    assert mlp.n_params(sizes) == 270_093
    p = mlp.init_one(jax.random.key(0), sizes)
    assert sum(x.size for x in jax.tree.leaves(p)) == 270_093
    for j, fan_in in enumerate(sizes[:-1]):
        w = np.asarray(p[f"w{j}_io"])
        assert abs(w.mean()) < 0.01 and abs(w.std() * np.sqrt(fan_in) - 1) < 0.05
        assert not np.asarray(p[f"b{j}_o"]).any()
    assert (cfg.lr, cfg.batch, cfg.teacher_epochs, cfg.student_epochs) == (3e-4, 1024, 5, 5)
    assert (cfg.noise_examples, cfg.n_models, cfg.aux_logits) == (60000, 100, 3)
