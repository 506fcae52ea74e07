"""Device mesh (data, fsdp, tensor) and logical-axis rules for params and activations.

Params carry logical axis names (`param_logical_axes`); `RULES` maps them to mesh axes. A
dimension that a mesh axis does not divide is replicated instead (e.g. SmolLM2's 3 kv heads
on tensor=2), so every model runs on every mesh and the choice is visible in `spec_table`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sjax.config import MeshConfig
from sjax.errors import SjaxError

AXES = ("data", "fsdp", "tensor")
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % fixed:
            raise SjaxError(f"mesh: {n_devices} devices are not divisible by the fixed axes "
                            f"(product {fixed})")
        sizes[sizes.index(-1)] = n_devices // fixed
    if int(np.prod(sizes)) != n_devices:
        raise SjaxError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are "
                        f"{n_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for one array; mesh axes that do not divide a dimension are dropped."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if a not in used) if name else ()
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        while mesh_axes and dim % size:
            mesh_axes = mesh_axes[:-1]  # drop the innermost axis until it divides
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of logical axes (tuples) and matching shapes (tuples)."""
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(a, s, mesh)),
                        axes_tree, shapes_tree, is_leaf=is_leaf)


def spec_table(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> dict[str, P]:
    """{'layers/wq_ldnh': PartitionSpec(...), ...}: what `tree_shardings` chooses, by name."""
    shardings = tree_shardings(axes_tree, shapes_tree, mesh)
    flat = jax.tree.flatten_with_path(shardings)[0]
    return {"/".join(k.key for k in path): s.spec for path, s in flat}


def global_array(x, sharding: NamedSharding) -> jax.Array:
    """A host value as a global array: each process transfers only the shards of its own
    devices (works the same on one host and across hosts)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value on every process: local copy, replica, or an all-gather across hosts."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place(host_tree: Any, shardings: Any, dtype=None) -> Any:
    """Put numpy arrays on devices shard by shard (no device ever holds the whole array)."""

    def put(x: np.ndarray, sharding: NamedSharding):
        return global_array(x if dtype is None else np.asarray(x).astype(dtype), sharding)

    return jax.tree.map(put, host_tree, shardings)


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Leaves already sharded on `mesh` stay; others (scalars, counters) are replicated."""

    def put(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh == mesh:
            return x
        return global_array(jax.device_get(x), NamedSharding(mesh, P()))

    return jax.tree.map(put, tree)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split (data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in RULES["batch"]]))


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Arrays with a batch axis (`axis`) split over data x fsdp, the rest replicated."""
    spec = [None] * ndim
    spec[axis] = RULES["batch"]
    return NamedSharding(mesh, P(*spec))

