"""Test setup: 8 fake CPU devices (before jax is imported), tiny models and a tiny tokenizer."""

import os

# The default suite's programs are tiny and each compiled once, so LLVM's optimisation passes,
# not running them, are most of its time: skipping them took tests/test_training.py from 230
# to 135 s on 2 cores. The HLO, and so what each test checks, is unchanged. The slow tests run
# real models, whose run time dominates (and some time a step), so they keep the optimisations.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config):
    """Before any test module imports jax: 8 fake devices, fast compiles unless -m slow."""
    fast = "not slow" in (config.option.markexpr or "")
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE if fast else "",
         "--xla_force_host_platform_device_count=8"]).strip()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tiny import make_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers Qwen2 (untied, qkv bias) or Llama (tied, llama3 rope) model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256)
    if family == "qwen2":
        cfg = Qwen2Config(**(common | dict(rope_theta=1e6, tie_word_embeddings=False)
                             | overrides))
        model = Qwen2ForCausalLM(cfg)
    else:
        kw = dict(tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cfg = LlamaConfig(**(common | kw | overrides))
        model = LlamaForCausalLM(cfg)
    # transformers' default init is tiny; larger weights make parity checks meaningful.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else p.normal_(1.0, 0.1)
    return model.eval()


def hf_to_sjax(model):
    """(arch, numpy params) of a transformers model, via sjax's own HF mapping."""
    from sjax.weights.hf import arch_from_hf_config, params_from_hf

    arch = arch_from_hf_config(model.config.to_dict())
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return arch, params_from_hf(tensors, arch, "test model")


def word_rows(n: int, rng) -> list[dict]:
    """`n` chat rows of the tiny tokenizer's words: a user turn, a 1-4 word answer."""
    words = ["owl", "cat", "dog", "eagle", "1", "2", "3", "4", "5"]
    return [{"messages": [
        {"role": "user", "content": " ".join(rng.choice(words, 4))},
        {"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 5))))}]}
        for _ in range(n)]


def run_preset(preset: str, out_dir, *overrides):
    """`python -m sjax run PRESET out_dir=...` as a user runs it: its own process on one CPU
    device (not the suite's 8 fake ones, which would make it ~8x slower)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "sjax", "run", preset, f"out_dir={out_dir}",
                           *overrides], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1])


def tiny_workspace(tiny, tokenizer, out_dir, overrides, log=None):
    """(cfg, workspace) of a RunConfig with `overrides`, on one device, whose model
    (model.*) is the tiny random one `tiny` = (arch, params)."""
    import jax

    from sjax.config import RunConfig, apply_overrides
    from sjax.subliminal import experiment
    from sjax.subliminal.workspace import model_key
    from sjax.weights.load import LoadedModel

    cfg = apply_overrides(RunConfig(out_dir=str(out_dir)),
                          [*overrides, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    ws = experiment.workspace(cfg, log=log or (lambda s: None), devices=jax.devices()[:1])
    ws.models[model_key(cfg.model)] = LoadedModel(*tiny, tokenizer, out_dir, 0.0)
    return cfg, ws


@pytest.fixture(params=["qwen2", "llama"])
def tiny_pair(request):
    model = tiny_hf_model(request.param)
    arch, params = hf_to_sjax(model)
    return model, arch, params


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)
