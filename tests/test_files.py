"""Cache and file safety: atomic writes, pinned installs racing from several processes,
tampered files, JSONL readers, MNIST builds keyed by their source."""

import gzip
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sjax import files
from sjax.mnist import data as mnist_data
from sjax.errors import SjaxError
from sjax.jsonl import read_done_ids, read_rows, resume_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]
# six.py inside the six 1.16.0 wheel: a 35 kB stand-in for a registry model's GGUF parts
SIX = ("six==1.16.0",)
SIX_PY = files.Pinned(("six.py",), 34_549,
                      "4ce39f422ee71467ccac8bed76beb05f8c321c7f0ceda9279ae2dfa3670106b3")

RACER = """
import sys
from sjax.files import Pinned
from sjax.weights import registry
registry.REGISTRY["six"] = registry.RegistryEntry("six", ("six==1.16.0",),
                                                  Pinned(("six.py",), {size}, "{sha}"))
print(registry.resolve("six"))
"""


def test_processes_racing_into_an_empty_cache_install_once(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "SJAX_CACHE": str(cache)}
    code = RACER.format(size=SIX_PY.size, sha=SIX_PY.sha256)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    path = cache / "models" / "six.gguf"
    assert {out.strip() for out, _ in outs} == {str(path)}
    assert sum(err.count("sjax: installing") for _, err in outs) == 1
    assert files.sha256_file(path) == SIX_PY.sha256
    # no temp file or pip scratch folder is left behind, only the file, its stamp, the lock
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".install-six.gguf.lock", "six.gguf", "six.gguf.verified"]


def test_a_file_that_does_not_match_its_pin_is_refused(tmp_path):
    dest = tmp_path / "six.py"
    wrong = files.Pinned(SIX_PY.parts, SIX_PY.size, "0" * 64)
    with pytest.raises(SjaxError, match=r"^six: six.py from PyPI is 34549 bytes with sha256 "
                                        r"4ce39f.*pinned 34549 bytes.*0000; refused$"):
        files.install_pinned("six", SIX, {dest: wrong})
    assert [p.name for p in tmp_path.iterdir()] == [".install-six.py.lock"]
    files.install_pinned("six", SIX, {dest: SIX_PY})
    # changed after install (same size): the stamp no longer matches, the hash catches it
    data = bytearray(dest.read_bytes())
    data[100] ^= 1
    dest.write_bytes(bytes(data))
    with pytest.raises(SjaxError, match=r"six.py: sha256 .* does not match the expected"):
        files.install_pinned("six", SIX, {dest: SIX_PY})


def test_tampered_mnist_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SJAX_CACHE", str(tmp_path))
    folder = mnist_data.source_folder()
    assert sorted(p.name for p in folder.glob("*.gz")) == sorted(mnist_data.PINNED)
    labels = mnist_data.read_idx(folder / "t10k-labels-idx1-ubyte.gz", 1)
    assert labels.shape == (10_000,) and np.bincount(labels)[1] == 1135
    assert not (tmp_path / "mnist" / "pip").exists() and not list(tmp_path.glob("**/*.tmp"))
    f = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # one label changed, gzip still valid
    f.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(SjaxError, match=r"t10k-labels-idx1-ubyte.gz: .*(bytes, expected|sha256)"):
        mnist_data.source_folder()


def _idx_folder(path, seed):
    rng = np.random.default_rng(seed)
    path.mkdir()
    for split, n in (("train", 6), ("test", 4)):
        img, lbl = mnist_data.FILES[split]
        for stem, arr, magic in ((img, rng.integers(0, 256, (n, 28, 28)), 0x803),
                                 (lbl, rng.integers(0, 10, n), 0x801)):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (path / stem).write_bytes(header + arr.astype(np.uint8).tobytes())
    return path


def test_mnist_build_is_keyed_by_its_source(tmp_path):
    a, b = _idx_folder(tmp_path / "a", 0), _idx_folder(tmp_path / "b", 1)
    got_a = mnist_data.load(str(a), str(tmp_path / "tfds"))
    got_b = mnist_data.load(str(b), str(tmp_path / "tfds"))  # same data dir, other source
    np.testing.assert_array_equal(got_a["train"][1], mnist_data.read_split(a, "train")[1])
    np.testing.assert_array_equal(got_b["train"][0], mnist_data.read_split(b, "train")[0])
    assert mnist_data.source_key(a) != mnist_data.source_key(b)
    assert len(list((tmp_path / "tfds").glob("*/sjax_mnist/1.0.0"))) == 2


def test_atomic_write_names_and_failures(tmp_path):
    path = tmp_path / "out.json"
    t1, t2 = files.temp_path(path), files.temp_path(path)
    assert t1 != t2 and t1.parent == tmp_path
    assert f".{socket.gethostname()}.{os.getpid()}." in t1.name
    files.atomic_write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # the temp file is gone
    files.atomic_write(tmp_path / "dir", lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("y")))
    assert (tmp_path / "dir" / "x").read_text() == "y"
    data = os.urandom(1000)
    files.atomic_write(tmp_path / "blob", lambda tmp: tmp.write_bytes(data))
    assert files.sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_user_jsonl_keeps_an_unterminated_last_row(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": 0}')  # a hand-written one-row file without its newline
    assert read_rows(one) == [{"id": 0}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 0}\n\n{"id": 1}\r\n{"id": 2}')
    assert read_rows(rows) == [{"id": 0}, {"id": 1}, {"id": 2}]
    rows.write_text('{"id": 0}\n{"id": 1')
    with pytest.raises(SjaxError, match=r"rows.jsonl: line 2 is not valid JSON"):
        read_rows(rows)
    with pytest.raises(SjaxError, match=r"nope.jsonl: no such file"):
        read_rows(tmp_path / "nope.jsonl")


def test_resumed_jsonl_drops_and_cuts_a_torn_tail(tmp_path):
    path = tmp_path / "raw.jsonl"
    assert resume_rows(path) == [] and read_done_ids(path) == set()
    write_rows(path, [{"id": 0}, {"id": 1}])
    with open(path, "a") as f:
        f.write('{"id": 2, "compl')  # an append cut by a crash
    assert read_done_ids(path) == {0, 1}
    assert path.read_text() == '{"id": 0}\n{"id": 1}\n'  # cut, so appending goes on cleanly
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(SjaxError, match=r"raw.jsonl: line 2 is not valid JSON"):
        resume_rows(path)


def test_one_row_dataset_without_final_newline_trains_on_its_row(tmp_path, tiny_tokenizer):
    from sjax.data import sft

    path = tmp_path / "one.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "owl?"}, '
                    '{"role": "assistant", "content": "owl"}]}')
    data = sft.load_jsonl(path, tiny_tokenizer, 64)
    assert len(data.ids) == 1 and data.masks[0].sum() > 0


def test_installs_take_wheels_only_and_run_no_package_code(tmp_path, monkeypatch):
    """pip is asked for wheels only with no dependencies, into a scratch folder: no setup.py
    can run before the sha256 check; a failed pip is one line naming the packages."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no matching distribution\n")

    monkeypatch.setattr(files.subprocess, "run", fake_run)
    pin = files.Pinned(("six.py",), 1, "0" * 64)
    with pytest.raises(SjaxError, match=r"^six: pip install of six==1.16.0 failed: ERROR: no "
                                        r"matching distribution$"):
        files.install_pinned("six", ("six==1.16.0",), {tmp_path / "six.py": pin})
    (cmd,) = calls
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd and cmd[-1] == "six==1.16.0"
    target = Path(cmd[cmd.index("--target") + 1])
    assert target.parent == tmp_path and not target.exists()  # scratch, removed
    assert not (tmp_path / "six.py").exists()
