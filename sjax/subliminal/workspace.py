"""One run folder: its manifest and stage cache keys, the process-0 writer, and the lazily
loaded models and teachers the stages share.

The stage contract: a `Stage` is a name, `reads(cfg)` (the slice of the config it reads, a
frozen dataclass) and `body(ws, slice, folder)`. The workspace hashes exactly that slice
(plus the upstream stages' output hashes) for the stage's cache key and hands the body only
the slice; the workspace holds no config, so a stage cannot read a field its key does not
cover.

A stage records in `RUN/manifest.json` its key and the sha256 of each output. A rerun skips
a stage whose record matches (after checking its outputs' hashes: an edited or corrupted
file is an error, never silently used); a stage that died half-way resumes its finished
units (generation rows, training checkpoints, per-condition evals) unless its key changed,
in which case its folder is cleared first.

Across processes (`--procs N`, a TPU pod) every process runs every stage's compute on its
own devices, and only process 0 writes into the run folder (`Writer`), which hosts must
then share; whether a unit is already done is process 0's answer (`done`), so all
processes do the same work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sjax import distributed
from sjax.config import MeshConfig, ModelConfig, RunConfig, TrainConfig
from sjax.errors import SjaxError
from sjax.files import atomic_write_json, sha256_file
from sjax.models.transformer import with_adapters
from sjax.sharding import global_array, make_mesh, to_host
from sjax.subliminal import numbers
from sjax.weights.load import load_model
from sjax.weights.tree import load_tree
from sjax.writer import Writer

CONTROL = "control"  # the teacher without the trait: the base model, no system prompt


def digest(obj) -> str:
    """sha256 of a JSON-able object (a config slice, an output listing)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_names(targets: tuple[str, ...], control: bool = True) -> list[str]:
    return [CONTROL, *targets] if control else list(targets)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    reads: Callable[[RunConfig], Any]  # cfg -> the frozen slice the body reads
    body: Callable[[Workspace, Any, Path], list[Path]]  # -> its output files


@dataclasses.dataclass(frozen=True)
class Finetune:
    """How a saved training result applies to a base model: LoRA adapters attached at
    `lora_scale` (alpha / rank), or full weights (scale unused, 0)."""

    mode: str
    lora_scale: float

    @classmethod
    def of(cls, train: TrainConfig) -> Finetune:
        return cls(train.mode, train.lora_alpha / train.lora_rank if train.mode == "lora"
                   else 0.0)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """What building a teacher reads: the base model, the system prompt's category, and for
    a fine-tuned teacher (its params in RUN/teachers/) how they apply to the base; whether
    the control teacher is tuned too (teacher.control_data) or is the base."""

    model: ModelConfig
    category: str
    kind: str
    finetune: Finetune | None
    control_finetuned: bool = False

    @classmethod
    def of(cls, cfg: RunConfig) -> TeacherSpec:
        ft = Finetune.of(cfg.teacher.ft_train) if cfg.teacher.kind == "finetuned" else None
        return cls(cfg.model, cfg.category, cfg.teacher.kind, ft,
                   ft is not None and bool(cfg.teacher.control_data))


def model_key(mcfg: ModelConfig) -> tuple:
    """What makes two model configs load the same params (dtype and remat are compute-time)."""
    return (mcfg.name, mcfg.path, mcfg.init, mcfg.param_dtype)


def apply_trained(base, path: Path, finetune: Finetune):
    """The trained model from a saved training result, exactly as it was trained: the base
    with the LoRA adapters attached (the adapter path of the train step, not a merge into
    the base dtype), or the trained full weights in their saved dtype."""
    tree = load_tree(path)
    host = lambda t: to_host(t) if isinstance(t, jax.Array) else np.asarray(t)  # noqa: E731
    if finetune.mode == "lora":  # small: replicated on the base's mesh
        sh = base["embed_vd"].sharding
        rep = NamedSharding(sh.mesh, PartitionSpec()) if isinstance(sh, NamedSharding) else sh
        return with_adapters(base, jax.tree.map(lambda t: global_array(host(t), rep), tree),
                             finetune.lora_scale)
    return jax.tree.map(lambda b, t: global_array(host(t), b.sharding), base, tree)


class Workspace:
    """A run folder (out_dir/name): manifest, stage keys, writer, model and teacher caches."""

    def __init__(self, root: Path, mesh: MeshConfig, log=None, devices=None,
                 reuse: Path | None = None):
        self.root = Path(root)
        self.reuse = Path(reuse) if reuse else None  # a run folder to adopt finished stages from
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.writer = Writer(distributed.is_main())
        self.manifest_path = self.root / "manifest.json"
        self.manifest = (json.loads(self.manifest_path.read_text())
                         if self.manifest_path.is_file() else {"stages": {}})
        self.mesh_config, self.devices = mesh, devices  # devices: default all
        self.models: dict = {}  # model_key -> LoadedModel
        self.teachers: dict = {}  # (TeacherSpec, name) -> (params, system prompt)
        self.order: list[str] = []  # stages taken up in this invocation, in data-flow order
        self.model_loads = 0  # checkpoints this invocation read (0 on a cached rerun)
        self._mesh = None

    # ------------------------------------------------------------------------- models

    @property
    def mesh(self):
        if self._mesh is None:
            self._mesh = make_mesh(self.mesh_config, self.devices)
        return self._mesh

    def model(self, mcfg: ModelConfig):
        key = model_key(mcfg)
        if key not in self.models:
            m = load_model(mcfg, self.mesh)
            self.model_loads += 1
            self.log(f"loaded {m.source.name} ({m.arch.n_params / 1e6:.0f}M params) in "
                     f"{m.load_seconds:.1f}s")
            self.models[key] = m
        return self.models[key]

    def teacher(self, spec: TeacherSpec, name: str):
        """(params, system prompt) of a teacher: the base model, prompted or fine-tuned."""
        key = (spec, name)
        if key not in self.teachers:
            base = self.model(spec.model).params
            if name == CONTROL and not spec.control_finetuned:
                self.teachers[key] = (base, "")
            elif spec.kind == "prompted":
                self.teachers[key] = (base, numbers.system_prompt(name, spec.category))
            else:
                path = self.root / "teachers" / name / "params.safetensors"
                self.teachers[key] = (apply_trained(base, path, spec.finetune), "")
        return self.teachers[key]

    @staticmethod
    def done(path: Path) -> bool:
        """Whether a unit's last file exists, as process 0 sees it (the same everywhere)."""
        return bool(distributed.from_main(path.is_file()))

    # ------------------------------------------------------------------------- stages

    def upstream(self, name: str) -> list[str]:
        return self.order[:self.order.index(name)]

    def stage_key(self, stage: Stage, cfg: RunConfig) -> tuple[dict, Any]:
        """(cache key, slice): the slice's hash and the upstream stages' output hashes."""
        part = stage.reads(cfg)
        stages = self.manifest["stages"]
        key = {"config": digest(dataclasses.asdict(part)),
               "inputs": {s: digest(stages[s]["outputs"]) for s in self.upstream(stage.name)}}
        return key, part

    def run_stage(self, stage: Stage, cfg: RunConfig, forced: bool) -> None:
        name = stage.name
        if name not in self.order:
            self.order.append(name)
        key, part = self.stage_key(stage, cfg)
        stages = self.manifest["stages"]
        rec = stages.get(name)
        # process 0's manifest decides for all: hosts that see the shared folder late must
        # not skip a stage the others run (they would wait in a collective forever)
        if distributed.from_main(bool(rec and not forced and rec["key"] == key)):
            if self.writer.main:  # the one whose manifest decided
                self.verify(name, rec)
            self.log(f"[{name}] up to date, skipped")
            return
        folder = self.root / name
        if not forced and self.adopt(name, key, folder):
            return
        if self.writer.main:
            marker = folder / ".stage_key.json"
            if forced or (marker.is_file() and json.loads(marker.read_text()) != key):
                # stale partial work made for another config or input
                self.clear(folder, name)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, key)
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        outputs = stage.body(self, part, folder)
        distributed.barrier(f"{name} done")  # process 0's outputs are complete
        seconds = time.perf_counter() - t0
        stages[name] = {"key": key, "seconds": seconds,
                        "outputs": {str(p.relative_to(self.root)): sha256_file(p)
                                    for p in outputs}}
        self.writer.write_json(self.manifest_path, self.manifest)
        self.log(f"[{name}] done in {seconds:.1f}s")

    def adopt(self, name: str, key: dict, folder: Path) -> bool:
        """Copy stage `name` from the `reuse` run folder when it finished there under the same
        key (same config slice, same upstream outputs), so that arms differing only
        downstream (e.g. the students' init or loss) share one set of teachers and data."""
        if self.reuse is None:
            return False
        src_manifest = self.reuse / "manifest.json"
        if not src_manifest.is_file():
            raise SjaxError(f"--reuse {self.reuse}: no manifest.json there (not a run folder)")
        rec = json.loads(src_manifest.read_text())["stages"].get(name)
        if not (rec and rec["key"] == key):
            return False
        if self.writer.main:
            self.verify(name, rec, self.reuse)
            self.clear(folder, name)
            shutil.copytree(self.reuse / name, folder)
            self.manifest["stages"][name] = rec
            self.writer.write_json(self.manifest_path, self.manifest)
        distributed.barrier(f"{name} adopted")
        self.log(f"[{name}] adopted from {self.reuse}")
        return True

    @staticmethod
    def clear(folder: Path, name: str) -> None:
        """Remove a stage's old work; one that stays would be resumed as if it were valid."""
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SjaxError(f"{folder}: cannot clear stage {name}'s old work "
                            f"({e.strerror or e}); remove it by hand") from None

    def verify(self, name: str, rec: dict, root: Path | None = None) -> None:
        """Every output of stage `name`'s record is present with its sha256 (in `root`,
        default this run folder)."""
        for rel, want in rec["outputs"].items():
            path = (root or self.root) / rel
            if not path.is_file():
                raise SjaxError(f"{path}: missing, but the manifest lists it as an output of "
                                f"stage {name}; rerun with --force {name}")
            if sha256_file(path) != want:
                raise SjaxError(f"{path}: contents differ from the manifest's sha256 (edited or "
                                f"corrupted); rerun with --force {name}")
