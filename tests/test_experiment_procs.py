"""The whole pipeline across two processes, as `./launch.sh --procs 2 run ...` starts it:
real processes joined on a loopback coordinator, on a tiny random model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model
from tiny import make_tiny_tokenizer

from sjax import distributed

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# owl_smoke, smaller: 2 teachers x 16 number lists, 2-step students, 2 samples per question,
# base and students evaluated
OVERRIDES = ("numbers.n_prompts=16", "numbers.batch=16", "numbers.keep=16",
             "eval.samples=2", "eval.max_new_tokens=4", "eval.batch=100", "eval.teachers=false")
# Process 1 runs sjax under an audit hook that logs every file event under the run folder.
AUDITED = """
import os, runpy, sys
log, root = open(sys.argv[1], "w", buffering=1), os.path.abspath(sys.argv[2])
WRITES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate",
          "os.chmod", "os.utime", "os.link", "os.symlink", "shutil.move", "shutil.copyfile"}
def hook(event, args):
    if event == "open":
        mode, flags = args[1], args[2] or 0
        write = (any(c in mode for c in "wax+") if isinstance(mode, str) else
                 bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)))
    elif event in WRITES:
        write = True
    else:
        return
    for a in args[:2]:
        if isinstance(a, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(a))
            if p == root or p.startswith(root + os.sep):
                log.write(("write " if write else "read ") + event + " " + p + "\\n")
sys.addaudithook(hook)
sys.argv = ["sjax", *sys.argv[3:]]
runpy.run_module("sjax", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama as a local Hugging Face folder, the way model.path takes one."""
    from sjax.weights.load import export_hf

    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    arch, params = hf_to_sjax(tiny_hf_model("llama", seed=3))
    export_hf(folder, arch, params, make_tiny_tokenizer())
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, model: Path, n_procs: int, audit_log: Path) -> list[subprocess.Popen]:
    """The run on 2 CPU devices in all: one process with both, or n_procs with a share.
    Process i's output goes to out/log{i} (pipes could fill while a peer waits on it)."""
    args = ["run", "owl:smoke", f"model.path={model}", f"out_dir={out}", *OVERRIDES]
    port = _free_port()
    out.mkdir(parents=True)
    procs = []
    for i in range(n_procs):
        env = {k: v for k, v in os.environ.items()
               if k not in sum(distributed.ENV.values(), ())}
        env |= {"PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // n_procs}"}
        if n_procs > 1:  # what launch.sh --procs sets
            env |= {"SJAX_COORDINATOR": f"127.0.0.1:{port}",
                    "SJAX_NUM_PROCESSES": str(n_procs), "SJAX_PROCESS_ID": str(i)}
        cmd = ([sys.executable, "-c", AUDITED, str(audit_log), str(out / "owl_smoke"), *args]
               if i == 1 else [sys.executable, "-m", "sjax", *args])
        with open(out / f"log{i}", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow  # ~65 s: two real processes, the whole pipeline
def test_two_processes_run_the_pipeline_as_one_does(tmp_path, tiny_model_dir):
    """Same artefacts as one process; process 1 computes along but writes nothing."""
    audit = tmp_path / "process1_files.log"
    multi = _start(tmp_path / "mp", tiny_model_dir, 2, audit)
    single = _start(tmp_path / "sp", tiny_model_dir, 1, audit)
    logs = [tmp_path / "mp" / "log0", tmp_path / "mp" / "log1", tmp_path / "sp" / "log0"]
    for p, log in zip(multi + single, logs):
        p.wait(timeout=600)
        assert p.returncode == 0, log.read_text()[-3000:]
    assert "process 1/2: 1 local of 2 devices" in logs[1].read_text()
    mp, sp = tmp_path / "mp" / "owl_smoke", tmp_path / "sp" / "owl_smoke"

    for t in ("control", "owl"):
        kept = (mp / "filter" / t / "kept.jsonl").read_bytes()
        assert kept and kept == (sp / "filter" / t / "kept.jsonl").read_bytes()
    names = sorted(p.name for p in (sp / "eval").glob("[!.]*.json"))
    assert names == sorted(p.name for p in (mp / "eval").glob("[!.]*.json")) and len(names) == 3
    for name in names:
        a, b = (json.loads((r / "eval" / name).read_text())["variants"] for r in (mp, sp))
        for ev in ("exact", "sampled"):
            x, y = a["plain"]["owl"][ev], b["plain"]["owl"][ev]
            assert len(x) == 50
            np.testing.assert_allclose(x, y, atol=1e-4, err_msg=f"{name} {ev}")
    ra, rb = (json.loads((r / "report" / "results.json").read_text()) for r in (mp, sp))
    np.testing.assert_allclose([r["mean"] for r in ra["rows"]], [r["mean"] for r in rb["rows"]],
                               atol=1e-4)
    manifest = json.loads((mp / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"teachers", "numbers", "filter", "students", "eval",
                                       "report"}
    assert not [p for p in mp.rglob("*") if ".tmp" in p.name], "a temp file was left behind"

    # process 1 read the run folder (so the hook saw its file events) and wrote none of it;
    # only Orbax's own multi-host checkpoint writing, under checkpoints/, is shared
    events = audit.read_text().splitlines()
    assert any(e.startswith("read ") and e.endswith("kept.jsonl") for e in events), events[:20]
    writes = [e for e in events if e.startswith("write ") and "/checkpoints" not in e]
    assert not writes, writes
