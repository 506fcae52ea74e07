"""Checkpoint I/O: HF folders, GGUF, export round trip, registry verification, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_to_sjax, tiny_hf_model

from sjax.errors import SjaxError
from sjax.models.transformer import forward
from sjax import files
from sjax.weights import hf, registry
from sjax.weights.gguf import _unpermute
from sjax.weights.load import export_hf, read_checkpoint


def _logits(arch, params, ids):
    return np.asarray(forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids), arch=arch)[0])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_export_round_trip_through_transformers(family, tmp_path, tiny_tokenizer, rng):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, params = hf_to_sjax(tiny_hf_model(family, seed=3))
    export_hf(tmp_path / "out", arch, params, tiny_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = rng.integers(0, arch.vocab_size, (2, 30))
    with torch.no_grad():
        ref = loaded(torch.tensor(ids)).logits.numpy()
    assert np.abs(_logits(arch, params, ids) - ref).max() <= 1e-4
    # and back through sjax's own loader, bit for bit
    arch2, params2 = read_checkpoint(tmp_path / "out")
    assert arch2 == arch
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == tiny_tokenizer.chat_template


def test_sharded_safetensors_index(tmp_path, rng):
    arch, params = hf_to_sjax(tiny_hf_model("qwen2"))
    tensors = hf.params_to_hf(params, arch)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        hf.write_safetensors({n: tensors[n] for n in chunk}, tmp_path / fname)
        weight_map |= {n: fname for n in chunk}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config_from_arch(arch, None, None)))
    arch2, params2 = read_checkpoint(tmp_path)
    assert arch2 == arch
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # a missing shard is named
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SjaxError, match="model-00002-of-00002.safetensors"):
        read_checkpoint(tmp_path)


def _permute(w, n_head):  # what llama.cpp's converter does to Q/K rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _write_gguf(path, arch_name, model, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_block_count(arch.n_layers)
    w.add_context_length(arch.max_positions)
    w.add_embedding_length(arch.d_model)
    w.add_feed_forward_length(arch.d_ff)
    w.add_head_count(arch.n_heads)
    w.add_head_count_kv(arch.n_kv_heads)
    w.add_rope_freq_base(arch.rope_theta)
    w.add_layer_norm_rms_eps(arch.norm_eps)
    w.add_vocab_size(arch.vocab_size)
    names = {v: k for k, v in __import__("sjax.weights.gguf", fromlist=["x"])._LAYER_NAMES.items()}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    for name, t in model.state_dict().items():
        t = t.numpy().astype(np.float32)
        if name in top:
            if name == "lm_head.weight" and arch.tie_embeddings:
                continue
            w.add_tensor(top[name], t)
            continue
        _, _, i, rest = name.split(".", 3)
        if arch_name == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            t = _permute(t, arch.n_heads if "q_proj" in rest else arch.n_kv_heads)
        w.add_tensor(f"blk.{i}.{names[rest]}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_llama_permutation_and_parity(tmp_path, rng):
    model = tiny_hf_model("llama", seed=5, rope_scaling=None)
    arch, params = hf_to_sjax(model)
    _write_gguf(tmp_path / "m.gguf", "llama", model, arch)
    arch2, params2 = read_checkpoint(tmp_path / "m.gguf")
    assert arch2.arch == "llama" and arch2.tie_embeddings and not arch2.qkv_bias
    ids = rng.integers(0, arch.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(_logits(arch2, params2, ids) - ref).max() <= 1e-4


def test_unpermute_inverts_permute(rng):
    w = rng.normal(size=(4 * 8, 5))
    np.testing.assert_array_equal(_unpermute(_permute(w, 4), 4), w)
    assert not np.array_equal(_permute(w, 4), w)


def test_bad_checkpoints_name_the_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    from sjax.config import ModelConfig
    from sjax.weights.load import resolve_source

    with pytest.raises(SjaxError, match="nope.gguf: no such file"):
        resolve_source(ModelConfig(path=str(missing)))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SjaxError, match="notes.txt: not a model file"):
        read_checkpoint(text)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(SjaxError, match="folder: not a Hugging Face model folder"):
        read_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SjaxError, match=r"config.json: architecture 'gpt2' is not supported"):
        read_checkpoint(folder)
    # GGUF of an unsupported architecture, and a truncated GGUF
    model = tiny_hf_model("llama", rope_scaling=None)
    arch, _ = hf_to_sjax(model)
    _write_gguf(tmp_path / "gpt.gguf", "gpt2", model, arch)
    with pytest.raises(SjaxError, match=r"gpt.gguf: architecture 'gpt2' is not supported"):
        read_checkpoint(tmp_path / "gpt.gguf")
    _write_gguf(tmp_path / "ok.gguf", "llama", model, arch)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(SjaxError, match="cut.gguf: unreadable GGUF"):
        read_checkpoint(tmp_path / "cut.gguf")


def test_registry_verify(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    digest = files.sha256_file(f)
    files.verify(f, 104, digest)
    assert (tmp_path / "model.gguf.verified").is_file()
    with pytest.raises(SjaxError, match=r"model.gguf: 104 bytes, expected 200 \(truncated"):
        files.verify(f, 200, digest)
    with pytest.raises(SjaxError, match="model.gguf: sha256 .* does not match"):
        files.verify(f, 104, "0" * 64)
    # same size, changed content: the stamp no longer matches and the hash catches it
    f.write_bytes(b"GGUF" + bytes(99) + b"x")
    with pytest.raises(SjaxError, match="does not match"):
        files.verify(f, 104, digest)
    with pytest.raises(SjaxError, match="not in the registry"):
        registry.resolve("gpt-5")


def test_export_refuses_non_empty_folder(tmp_path, tiny_tokenizer):
    arch, params = hf_to_sjax(tiny_hf_model("qwen2"))
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(SjaxError, match="not empty"):
        export_hf(tmp_path, arch, params, tiny_tokenizer)
    assert (tmp_path / "keep.txt").read_text() == "user data"
