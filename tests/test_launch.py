"""launch.sh: the TPU command survives any argument, --system installs nothing; and the
GPU check (benchmarks/gpu_check.sh) that runs in that mode."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRICKY = ["chat", "prompt=it's a \"quoted\" word", "system=$HOME `id` \\n", "a b"]


def _bash_words(line: str) -> list[str]:
    """The words bash parses `line` into (no command runs: only quote removal)."""
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_tpu_remote_command_keeps_quotes_spaces_and_dollars(tmp_path):
    out = subprocess.run([str(ROOT / "launch.sh"), "--tpu", "pod", "--zone", "z",
                          "--print-only", *TRICKY], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    ssh = [x for x in out.stdout.splitlines() if x.startswith("gcloud compute tpus tpu-vm ssh")]
    assert len(ssh) == 1
    words = _bash_words(ssh[0])  # how this shell's `eval` hands the line to gcloud
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    remote = next(w for w in words if w.startswith("--command="))[len("--command="):]
    # Run the remote command as a worker would, with a launch.sh that records its argv.
    home = tmp_path / "home"
    home.mkdir()
    stub = tmp_path / "launch.sh"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$HOME/argv"\n')
    stub.chmod(0o755)
    with tarfile.open(home / "sjax-src.tar.gz", "w:gz") as tar:
        tar.add(stub, arcname="./launch.sh")
    subprocess.run(["bash", "-c", remote], check=True, env={**os.environ, "HOME": str(home)})
    assert (home / "argv").read_text().split("\0")[:-1] == TRICKY


def test_system_mode_uses_the_given_python_and_creates_no_venv(tmp_path):
    folder = tmp_path / "arch"  # a config.json alone: `info` reads no weights
    folder.mkdir()
    cfg = json.loads((ROOT / "sjax/weights/archs/smollm2-135m/config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 2}))
    venv = tmp_path / "venv"
    env = {**os.environ, "SJAX_SYSTEM": "1", "PYTHON": sys.executable, "SJAX_VENV": str(venv)}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(ROOT / "launch.sh"), "info", f"model.path={folder}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import jax

    line = [x for x in out.stderr.splitlines() if x.startswith("launch.sh --system:")]
    assert len(line) == 1 and f"{sys.executable}: jax {jax.__version__}," in line[0]
    assert "backend cpu" in line[0] and " x cpu" in line[0]
    assert '"n_layers": 2' in out.stdout and '"d_model": 576' in out.stdout
    assert not venv.exists()


def test_system_mode_names_a_missing_package(tmp_path):
    bare = tmp_path / "bare"  # a stdlib-only interpreter
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    out = subprocess.run([str(ROOT / "launch.sh"), "--system", "info"], capture_output=True,
                         text=True, cwd=ROOT,
                         env={**os.environ, "PYTHON": str(bare / "bin/python"),
                              "SJAX_VENV": str(tmp_path / "venv")})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks the required package(s) jax," in lines[0], out.stderr
    assert not (tmp_path / "venv").exists()


def _gpu_check(out, *args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a one-GPU machine has
    return subprocess.run([str(ROOT / "benchmarks/gpu_check.sh"), *args, str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path):
    (tmp_path / "archs").write_text("a file where the tiny configs' folder should be")
    proc = _gpu_check(tmp_path, "--tiny", "--only", "parity,devices,peak", "--budget", "200")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "launch.sh --system:" in proc.stderr  # the system check ran first
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sec = report["sections"]
    assert list(sec) == ["devices", "peak", "parity"]  # priority order, not the --only order
    assert sec["devices"]["status"] == "ok" and sec["devices"]["result"]["backend"] == "cpu"
    assert sec["peak"]["status"] == "ok" and sec["peak"]["result"]["bf16_tflop_s"] > 0
    assert sec["parity"]["status"] == "error" and "archs" in sec["parity"]["error"]
    assert "not ok: parity" in proc.stdout


@pytest.mark.slow  # ~8 min on 2 busy cores: every section of the GPU check at toy sizes
def test_gpu_check_tiny_runs_every_section(tmp_path):
    proc = _gpu_check(tmp_path, "--tiny", timeout=1800)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sec = report["sections"]
    assert {k: v["status"] for k, v in sec.items()} == {k: "ok" for k in (
        "devices", "peak", "parity", "greedy", "train_small", "train_7b", "sample", "smoke")}, \
        proc.stdout[-3000:]
    assert proc.returncode == 0
    for fam in ("qwen2", "llama"):
        assert sec["parity"]["result"][fam]["fp32_max_abs_diff"] < 1e-4
        assert sec["greedy"]["result"][fam]["equal"]
    runs = sec["train_small"]["result"]["runs"]
    assert {(r["impl"], r["mode"], r["dtype"]) for r in runs} >= {
        ("sjax", "lora", "bfloat16"), ("sjax", "full", "bfloat16"), ("torch", "lora", "float32")}
    assert all(r["step_s"] > 0 and r["mfu_vs_989"] > 0 and r["mfu_vs_measured_peak"] > 0
               for r in runs)
    assert [r["mode"] for r in sec["train_7b"]["result"]["runs"]] == ["lora"]
    sample = sec["sample"]["result"]["results"]
    assert {r["batch"] for r in sample} == {2, 4}
    assert all(r["decode_vs_transformers"] > 0 for r in sample if r["impl"] == "sjax")
    assert sec["smoke"]["result"]["ok"]
