"""Timing and the matmul peak that MFU figures are measured against."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp

# Dense bf16 peak per device for accelerators (vendor figures, FLOP/s).
DEVICE_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                     "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                     "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def time_call(fn: Callable, *args, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds per call after `warmup` calls (compile), blocking on the results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(n: int | None = None, dtype=jnp.float32, batch: int = 1) -> float:
    """Measured FLOP/s of one jitted [batch, n, n] @ [batch, n, n] matmul on device 0, inputs
    in `dtype`, accumulated in fp32 (as every sjax matmul). n defaults to 2048 on CPU and
    8192 on accelerators, where a 2048^3 matmul is too short to reach the peak."""
    if n is None:
        n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jnp.ones((batch, n, n), dtype)
    f = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y,
                                        preferred_element_type=jnp.float32))
    dt = time_call(f, a, a, warmup=2, repeats=5)
    return 2 * batch * n ** 3 / dt


def device_peak(dtype="float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from): a table for accelerators, a
    measured matmul in the compute dtype on CPU (bf16 runs ~2x fp32 on AVX512-BF16)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        for name, flops in DEVICE_PEAK_FLOPS.items():
            if name.lower() in dev.device_kind.lower():
                return flops, f"{dev.device_kind} bf16 datasheet"
    name = jnp.dtype(dtype).name
    return (matmul_peak(dtype=jnp.dtype(dtype)),
            f"measured {name} 2048^3 jitted matmul on {dev.device_kind}")


def mfu(flops: float, seconds: float, peak_flops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: `flops` of model work (real tokens, not padding; see
    `training.train_flops`) done in `seconds`, over the peak of `n_devices` devices."""
    return flops / seconds / (peak_flops * n_devices)
