"""Generation: greedy equals step-by-step argmax, padding invariance, stops, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model

from sjax import sampling
from sjax.errors import SjaxError
from sjax.models.transformer import forward


@pytest.fixture(scope="module")
def qwen_tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=1))
    return arch, jax.tree.map(jnp.asarray, params)


def _naive_greedy(arch, params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = forward(params, jnp.asarray([seq]), arch=arch)
        seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
    return seq[len(prompt):]


def test_greedy_matches_full_forward_and_padding_invariance(qwen_tiny, tiny_tokenizer):
    arch, params = qwen_tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    gen = sampling.generate(params, arch, tiny_tokenizer, prompts, max_new_tokens=6,
                            stop_ids=[])
    for p, toks in zip(prompts, gen.tokens):
        assert toks == _naive_greedy(arch, params, p, 6)
        alone = sampling.generate(params, arch, tiny_tokenizer, [p], max_new_tokens=6,
                                  stop_ids=[])
        assert alone.tokens[0] == toks
    # log-probs are the model's own
    assert all(lp <= 0 for row in gen.logprobs for lp in row)


def test_rows_stop_at_stop_tokens(qwen_tiny, tiny_tokenizer):
    arch, params = qwen_tiny
    prompt = [5, 6, 7]
    free = sampling.generate(params, arch, tiny_tokenizer, [prompt], max_new_tokens=6,
                             stop_ids=[]).tokens[0]
    stop = free[2]
    got = sampling.generate(params, arch, tiny_tokenizer, [prompt, [40, 41]], max_new_tokens=6,
                            stop_ids=[stop]).tokens[0]
    assert got == free[: free.index(stop) + 1]


def test_sampling_is_seeded_per_row(qwen_tiny, tiny_tokenizer):
    arch, params = qwen_tiny
    strat = sampling.Temperature(1.0, top_k=20, top_p=0.9)
    a = sampling.generate(params, arch, tiny_tokenizer, [[5, 6], [7, 8]], max_new_tokens=5,
                          strategy=strat, seed=3, row_ids=[10, 11], stop_ids=[])
    b = sampling.generate(params, arch, tiny_tokenizer, [[7, 8]], max_new_tokens=5,
                          strategy=strat, seed=3, row_ids=[11], stop_ids=[])
    assert a.tokens[1] == b.tokens[0]


def test_bad_generation_input(qwen_tiny, tiny_tokenizer):
    arch, params = qwen_tiny
    with pytest.raises(SjaxError, match="empty prompt list"):
        sampling.generate(params, arch, tiny_tokenizer, [], max_new_tokens=4)
    with pytest.raises(SjaxError, match="max_new_tokens must be > 0"):
        sampling.generate(params, arch, tiny_tokenizer, [[1]], max_new_tokens=0)
    with pytest.raises(SjaxError, match="exceeds the model's 256 positions"):
        sampling.generate(params, arch, tiny_tokenizer, [[1] * 250], max_new_tokens=10)
    with pytest.raises(SjaxError, match="temperature must be > 0"):
        sampling.Temperature(0.0)
