"""Mesh construction, the param PartitionSpec table, and sharded == single-device numerics."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model
from jax.sharding import PartitionSpec as P

from sjax import sharding
from sjax.config import MeshConfig
from sjax.errors import SjaxError
from sjax.models.transformer import forward, param_logical_axes, param_shapes
from sjax.weights.load import param_shardings


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_mesh_shapes():
    assert sharding.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(SjaxError, match="data\\*fsdp\\*tensor = 4 but there are 8"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(SjaxError, match="not divisible"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(SjaxError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_param_spec_table_on_2x2x2_mesh():
    arch, _ = hf_to_sjax(tiny_hf_model("qwen2"))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    table = sharding.spec_table(param_logical_axes(arch), param_shapes(arch), mesh)
    assert table == {
        "embed_vd": P("tensor", "fsdp"),
        "final_norm_d": P(),
        "lm_head_dv": P("fsdp", "tensor"),
        "layers/attn_norm_ld": P(),
        "layers/mlp_norm_ld": P(),
        "layers/wq_ldnh": P(None, "fsdp", "tensor"),
        "layers/wk_ldkh": P(None, "fsdp", "tensor"),
        "layers/wv_ldkh": P(None, "fsdp", "tensor"),
        "layers/wo_lnhd": P(None, "tensor", None, "fsdp"),
        "layers/bq_lnh": P(None, "tensor"),
        "layers/bk_lkh": P(None, "tensor"),
        "layers/bv_lkh": P(None, "tensor"),
        "layers/wg_ldf": P(None, "fsdp", "tensor"),
        "layers/wu_ldf": P(None, "fsdp", "tensor"),
        "layers/wd_lfd": P(None, "tensor", "fsdp"),
    }
    # a dimension the mesh axis does not divide is replicated (SmolLM2 has 3 kv heads)
    odd = dataclasses.replace(arch, n_heads=6, n_kv_heads=3)
    table = sharding.spec_table(param_logical_axes(odd), param_shapes(odd), mesh)
    assert table["layers/wk_ldkh"] == P(None, "fsdp")
    assert table["layers/wq_ldnh"] == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("axes", [(2, 2, 2), (1, 8, 1), (1, 1, 2)])
def test_sharded_forward_equals_single_device(axes, rng):
    arch, params = hf_to_sjax(tiny_hf_model("qwen2"))
    ids = rng.integers(0, arch.vocab_size, (8, 24))
    f = jax.jit(lambda p, t: forward(p, t, arch=arch)[0])
    ref = np.asarray(f(jax.device_put(params, jax.devices()[0]), ids))
    n = int(np.prod(axes))
    mesh = sharding.make_mesh(MeshConfig(*axes), devices=jax.devices()[:n])
    placed = sharding.place(params, param_shardings(arch, mesh))
    assert placed["layers"]["wq_ldnh"].sharding.spec == param_shardings(
        arch, mesh)["layers"]["wq_ldnh"].spec
    ids_s = sharding.global_array(ids, sharding.batch_sharding(mesh, 2))
    got = f(placed, ids_s)
    # fp32 sums in another order (per-shard partial sums): ~1e-5 on logits of size ~3 on
    # AVX2 CPUs, so 1e-4 absolute; a wrong shard layout moves logits by O(1)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-5)


def test_params_created_directly_in_their_shardings():
    from sjax.models.transformer import init_params
    from sjax.weights.load import init_sharded

    arch, _ = hf_to_sjax(tiny_hf_model("qwen2"))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = init_sharded(arch, jax.random.key(3), mesh)
    want = param_shardings(arch, mesh)
    jax.tree.map(lambda p, s: (p.sharding.spec == s.spec) or pytest.fail(str(p.sharding)),
                 params, want)
    ref = init_params(arch, jax.random.key(3))  # eager: XLA fuses the scaling differently
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                 params, ref)
