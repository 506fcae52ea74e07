"""Random-weight models of real architectures (`model.init=random`), for throughput work.

The architecture comes from a shipped Hugging Face config.json (`archs/NAME/config.json`) or
from `model.path` (a HF folder's config.json or a GGUF file's metadata); no tensor is read
and nothing is downloaded, so it runs where the checkpoints cannot go (a GPU box with no
registry access). Parameters are created directly in their shardings.

The tokenizer is a byte-level one built in code (id i is byte i, then <|endoftext|>,
<|im_start|>, <|im_end|>, with a ChatML template): it needs no file, round-trips any text,
and every id it emits is valid for every shipped vocabulary. Benchmarks feed random token
ids anyway; the pipeline only needs text in and text out. Ids past the tokenizer's 259 (a
random model samples them) decode to nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sjax.config import ModelConfig
from sjax.errors import SjaxError
from sjax.models.transformer import init_params
from sjax.weights import gguf as gguf_io
from sjax.weights import hf

ARCHS_DIR = Path(__file__).resolve().parent / "archs"
# registry checkpoints whose architecture ships under a plain name
ALIASES = {"qwen2.5-coder-0.5b-instruct": "qwen2.5-0.5b",
           "smollm2-135m-instruct": "smollm2-135m"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def shipped_archs() -> list[str]:
    return sorted(p.parent.name for p in ARCHS_DIR.glob("*/config.json"))


def arch_dir(name: str) -> Path:
    """The shipped folder (holding only config.json) of architecture `name` or its alias."""
    folder = ARCHS_DIR / ALIASES.get(name, name)
    if not (folder / "config.json").is_file():
        raise SjaxError(f"model.name: {name!r} has no shipped architecture for "
                        f"model.init=random (shipped: {', '.join(shipped_archs())}, or set "
                        "model.path to a config.json folder)")
    return folder


def byte_tokenizer():
    """A byte-level ChatML tokenizer: real transformers machinery, no vocabulary file."""
    # lazy: transformers takes seconds to import
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in gguf_io.bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab, [], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def hf_tensors(arch, seed: int = 0) -> dict:
    """`random_model`'s fp32 params (same key: the threefry stream does not depend on the
    sharding) in Hugging Face names, on the host: a transformers model built from the same
    config.json loads them, so both sides of a benchmark hold the same weights."""
    params = jax.jit(init_params, static_argnums=0)(arch, jax.random.key(seed))
    return hf.params_to_hf(jax.device_get(params), arch)


def random_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0):
    """A LoadedModel with random params (transformers' init) of the configured architecture."""
    # lazy: breaks the import cycle (load.py imports this module to dispatch here)
    from sjax.weights.load import LoadedModel, init_sharded, read_arch, resolve_source

    t0 = time.perf_counter()
    source = resolve_source(cfg)  # model.path, else the shipped arch_dir(model.name)
    arch = read_arch(source)
    tokenizer = byte_tokenizer()
    if len(tokenizer) > arch.vocab_size:
        raise SjaxError(f"{source}: vocab_size {arch.vocab_size} is smaller than the byte "
                        f"tokenizer's {len(tokenizer)} ids")
    params = init_sharded(arch, jax.random.key(seed), mesh, jnp.dtype(cfg.param_dtype))
    jax.block_until_ready(params)
    return LoadedModel(arch, params, tokenizer, source, time.perf_counter() - t0)
