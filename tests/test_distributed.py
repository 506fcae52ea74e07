"""Multi-host: real processes on loopback, JAX's multi-controller runtime, launch.sh plans."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sjax import distributed
from sjax.weights.tree import load_tree

TESTS = Path(__file__).parent
ROOT = TESTS.parent
WORKER = TESTS / "mp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SJAX_", "JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env | extra


def _start(out: Path, n_procs: int, *args: str, **extra) -> list[subprocess.Popen]:
    if n_procs == 1:
        return [subprocess.Popen([sys.executable, str(WORKER), str(out), "8", *args],
                                 env=_env(**extra), stderr=subprocess.PIPE, text=True)]
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(8 // n_procs), *args],
        env=_env(SJAX_COORDINATOR=f"127.0.0.1:{port}", SJAX_NUM_PROCESSES=str(n_procs),
                 SJAX_PROCESS_ID=str(i), **extra), stderr=subprocess.PIPE, text=True)
        for i in range(n_procs)]


def test_detect_reads_flags_and_environment():
    assert not distributed.detect({}).multi_process
    launch = distributed.detect({"SJAX_COORDINATOR": "10.0.0.1:1234", "SJAX_NUM_PROCESSES": "4",
                                 "SJAX_PROCESS_ID": "2"})
    assert launch == distributed.Launch("10.0.0.1:1234", 4, 2) and launch.multi_process
    assert distributed.detect({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}).num_processes == 2
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).tpu_pod
    assert not distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}).multi_process


@pytest.mark.slow  # ~45 s: two real processes
def test_two_processes_equal_one_process(tmp_path):
    multi = _start(tmp_path / "mp", 2)
    single = _start(tmp_path / "sp", 1)
    for p in multi + single:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a = json.loads((tmp_path / "mp" / "result.json").read_text())
    b = json.loads((tmp_path / "sp" / "result.json").read_text())
    assert a["processes"] == 2 and b["processes"] == 1
    assert len(a["losses"]) == 4
    np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-6)
    assert a["tokens"] == b["tokens"]
    pa, pb = load_tree(tmp_path / "mp" / "params.safetensors"), load_tree(
        tmp_path / "sp" / "params.safetensors")
    p1 = load_tree(tmp_path / "mp" / "params1.safetensors")  # what process 1 holds
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb)
    jax.tree.map(np.testing.assert_array_equal, pa, p1)


@pytest.mark.slow
def test_a_killed_worker_stops_the_others(tmp_path):
    procs = _start(tmp_path / "kill", 2, "--die-after-step", "2", SJAX_HEARTBEAT_S="5")
    t0 = time.perf_counter()
    errs = [p.communicate(timeout=240)[1] for p in procs]
    elapsed = time.perf_counter() - t0
    assert procs[1].returncode == -9  # SIGKILLed itself
    assert procs[0].returncode != 0, errs[0][-2000:]
    assert elapsed < 180
    assert not (tmp_path / "kill" / "result.json").exists()


def test_launch_print_only_for_a_tpu_pod():
    out = subprocess.run([str(ROOT / "launch.sh"), "--tpu", "my-pod", "--zone", "us-central2-b",
                          "--project", "proj", "--print-only", "run", "owl:paper",
                          "model.path=/data/qwen7b"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.strip()]
    assert any(x.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in x
               and "my-pod:" in x and "--zone=us-central2-b" in x and "--project=proj" in x
               for x in lines), out.stdout
    ssh = [x for x in lines if x.startswith("gcloud compute tpus tpu-vm ssh")]
    assert len(ssh) == 1 and "--worker=all" in ssh[0]
    assert "./launch.sh run owl:paper model.path=/data/qwen7b" in ssh[0]
    assert not (ROOT / "my-pod").exists()


def test_launch_procs_runs_local_processes(tmp_path):
    """`./launch.sh --procs 2 ...` starts two joined processes (here: `sjax info`)."""
    out = subprocess.run([str(ROOT / "launch.sh"), "--procs", "2", "info", "chat",
                          "model.name=smollm2-135m-instruct"], capture_output=True, text=True,
                         cwd=ROOT, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "process 0/2" in out.stderr and "process 1/2" in out.stderr
    assert "of 4 devices" in out.stderr
