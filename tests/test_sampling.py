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


def test_strategy_for_temperature():
    assert sampling.strategy_for(0.0) == sampling.Greedy()
    assert sampling.strategy_for(0.7) == sampling.Temperature(0.7)
    with pytest.raises(SjaxError, match="temperature must be > 0"):
        sampling.strategy_for(-1.0)


def test_greedy_equals_transformers_generate(tiny_tokenizer):
    import torch

    model = tiny_hf_model("llama", seed=2)
    arch, params = hf_to_sjax(model)
    prompt = [5, 9, 17, 33, 2, 71]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = sampling.generate(jax.tree.map(jnp.asarray, params), arch, tiny_tokenizer, [prompt],
                            max_new_tokens=12, stop_ids=[]).tokens[0]
    assert got == ref


def test_finished_rows_are_padded_and_frozen(qwen_tiny, tiny_tokenizer):
    arch, params = qwen_tiny
    free = sampling.generate(params, arch, tiny_tokenizer, [[5, 6, 7]], max_new_tokens=6,
                             stop_ids=[]).tokens[0]
    out, steps = sampling.generate_ids(
        params, jnp.asarray([[5, 6, 7]]), jnp.ones((1, 3), bool),
        jax.random.key(0)[None], jnp.asarray([free[1]]), jnp.int32(0), None, arch=arch,
        strategy=sampling.Greedy(), max_new_tokens=6, dtype=jnp.float32)
    assert np.asarray(out)[0].tolist() == free[:2] + [0] * 4
    assert int(steps) == 2  # the loop exits once every row is done


def test_prompt_bucket():
    assert [sampling.prompt_bucket(n) for n in (1, 16, 17, 33, 64, 65, 97)] == [
        16, 16, 32, 64, 64, 96, 128]


def test_sharded_generation_equals_single_device(qwen_tiny, tiny_tokenizer):
    from sjax.config import MeshConfig
    from sjax.sharding import make_mesh, place
    from sjax.weights.load import param_shardings

    arch, params = qwen_tiny
    prompts = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] for i in range(5)]
    ref = sampling.generate(params, arch, tiny_tokenizer, prompts, max_new_tokens=5,
                            stop_ids=[]).tokens
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = place(jax.device_get(params), param_shardings(arch, mesh))
    got = sampling.generate(sharded, arch, tiny_tokenizer, prompts, max_new_tokens=5,
                            stop_ids=[], mesh=mesh).tokens
    assert got == ref


def test_bulk_jsonl_resumes_without_redoing_rows(qwen_tiny, tiny_tokenizer, tmp_path):
    from sjax.jsonl import read_rows

    arch, params = qwen_tiny
    rows = [{"id": i, "prompt_ids": [5 + i, 6, 7], "prompt": f"p{i}"} for i in range(7)]
    kw = dict(batch_size=3, max_new_tokens=4, strategy=sampling.Temperature(1.0), seed=5)
    full = tmp_path / "full.jsonl"
    assert sampling.generate_jsonl(full, rows, params, arch, tiny_tokenizer, **kw) == 7
    part = tmp_path / "part.jsonl"
    assert sampling.generate_jsonl(part, rows[:3], params, arch, tiny_tokenizer, **kw) == 3
    with open(part, "a") as f:
        f.write('{"id": 3, "compl')  # a write torn by a crash
    assert sampling.generate_jsonl(part, rows, params, arch, tiny_tokenizer, **kw) == 4
    assert read_rows(part) == read_rows(full)
    assert sampling.generate_jsonl(part, rows, params, arch, tiny_tokenizer, **kw) == 0
    assert read_rows(full)[0].keys() == {"id", "prompt", "completion", "n_tokens"}


def test_constrained_numbers_always_pass_the_filter():
    """A random model with SmolLM2's real byte-level BPE vocabulary, sampled hot."""
    import dataclasses

    from sjax.constrained import number_list_constraint
    from sjax.subliminal.numbers import parse_numbers
    from sjax.models.transformer import init_params
    from sjax.weights.load import load_tokenizer
    from sjax.weights.registry import resolve

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    arch, _ = hf_to_sjax(tiny_hf_model("llama"))
    arch = dataclasses.replace(arch, vocab_size=len(tok))
    params = init_params(arch, jax.random.key(0))
    stops = sampling.default_stop_ids(tok)
    c = number_list_constraint(tok, stops, arch.vocab_size)
    assert int((c.tok_digits_v > 0).sum()) >= 10  # the digit tokens were found
    prompts = [[100 + i, 200, 300] for i in range(64)]
    assert c.max_tokens == 49
    gen = sampling.generate(params, arch, tok, prompts, max_new_tokens=c.max_tokens,
                            strategy=sampling.Temperature(2.0), constraint=c, seed=1)
    reasons = [parse_numbers(t)[1] for t in gen.texts]
    assert reasons == [None] * 64, [(t, r) for t, r in zip(gen.texts, reasons) if r][:5]
    assert all(t[-1] in stops for t in gen.tokens)  # every list ended by choice


@pytest.fixture(scope="module")
def smol_constraint():
    from sjax.constrained import number_list_constraint
    from sjax.weights.load import load_tokenizer
    from sjax.weights.registry import resolve

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    return tok, number_list_constraint(tok, sampling.default_stop_ids(tok), len(tok))


@pytest.mark.parametrize("text, ok", [
    ("1, 2, 3", True), ("1,2,3", True), ("1 2 3", True), ("1\n22\n333", True),
    ("1; 2", True), ("999", True), (", ".join(["7"] * 10), True),
    ("1, 2; 3", False), ("1,2, 3", False), ("1000", False), ("1,, 2", False),
    (", ".join(["7"] * 11), False), (", ".join(["7"] * 10) + ",", False), ("1, 2,", False), (" 1", False), ("1 - 2", False),
])
def test_constraint_state_machine(smol_constraint, text, ok):
    """Walk the tokens of `text` + stop through allowed/advance: accepted iff `ok`."""
    from sjax.subliminal.numbers import parse_numbers

    tok, c = smol_constraint
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    state = c.init_state(1)
    accepted = True
    for i in ids:
        if not bool(c.allowed(state)[0, i]):
            accepted = False
            break
        state = c.advance(state, jnp.asarray([i]))
    assert accepted == ok
    assert (parse_numbers(text)[1] is None) or not ok  # never accept what the filter rejects


def test_prefill_state_shapes_and_shared_prompt_rows(qwen_tiny):
    """`prefill` hands the decode loop a typed state; with samples=2 each prompt's cache and
    logits are repeated for its two decode rows."""
    arch, params = qwen_tiny
    tokens = jnp.asarray([[0, 5, 6], [7, 8, 9]])
    valid = jnp.asarray([[False, True, True], [True, True, True]])
    s = sampling.prefill(params, tokens, valid, jnp.int32(0), None, arch=arch,
                         max_new_tokens=4, dtype=jnp.float32, samples=2)
    assert isinstance(s, sampling.DecodeState) and s.grammar is None
    assert s.out_bn.shape == (4, 4) and s.kv_valid_bs.shape == (4, 7)
    assert s.cache["k_lbskh"].shape[1:3] == (4, 7)
    assert s.pos_b.tolist() == [2, 2, 3, 3]  # left padding does not count
    np.testing.assert_array_equal(s.logits_bv[0], s.logits_bv[1])
    assert not np.allclose(s.logits_bv[1], s.logits_bv[2])
