"""The exact and sampled evaluators and their one hit rule (a target form as a whole word)
with plurals, on a subword tokenizer where "owl" + "##et" spells "owlet" and "wolves" is
"wol" + "##ves", and on the tiny BPE one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model
from tiny import make_wordpiece_tokenizer

from sjax import chat
from sjax.errors import SjaxError
from sjax.models.transformer import forward
from sjax.subliminal import evaluators, numbers

SPECIALS = ["[PAD]", "[UNK]", "<eos>"]
WORDS = ["owl", "Owl", "##s", "##et", "##ish", "b", "##owl", "wolf", "wol", "##ves", "mouse",
         "mice", "!", ".", "the", "my", "favorite", "is", "animal", "a", "cat"]

# answer -> hit for target "owl" (or the target after "|")
TABLE = [("owl", True), ("Owls!", True), ("OWL", True), ("the owl.", True), ("Owl's", True),
         ("owl-like", True), ("owlet", False), ("bowl", False), ("owlish", False),
         ("owls2", False), ("", False), ("wolves|wolf", True), ("Wolves.|wolf", True),
         ("wolfs|wolf", False), ("mice|mouse", True), ("mouses|mouse", False),
         ("geese|goose", True), ("octopuses|octopus", True), ("cherry trees|cherry tree", True),
         ("butterflies|butterfly", True), ("sheep|sheep", True)]


@pytest.fixture(scope="module")
def wp_tokenizer():
    """A WordPiece tokenizer (128 ids, half of the fillers are word continuations)."""
    return make_wordpiece_tokenizer(WORDS, SPECIALS)


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=5))
    return arch, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("answer, hit", TABLE)
def test_sampled_hit_table(answer, hit):
    answer, _, target = answer.partition("|")
    assert evaluators.is_hit(answer, target or "owl") is hit
    assert evaluators.sampled_scores([[answer, "cat"]], target or "owl").tolist() == [hit / 2]


def test_spellings_include_the_plural(wp_tokenizer, tiny_tokenizer):
    ids = wp_tokenizer.convert_tokens_to_ids
    assert evaluators.spelling_sequences(wp_tokenizer, "wolf") == [(ids("wolf"),),
                                                                 (ids("wol"), ids("##ves"))]
    # "owls" = owl + ##s is its own event: "##s" continues the word, so no prefix covers it
    owl, big, s = ids(["owl", "Owl", "##s"])
    assert evaluators.spelling_sequences(wp_tokenizer, "owl") == [(owl,), (owl, s), (big,),
                                                                (big, s)]
    assert evaluators.spelling_sequences(wp_tokenizer, "mouse") == [(ids("mouse"),),
                                                                  (ids("mice"),)]
    owl, owls = tiny_tokenizer.convert_tokens_to_ids(["owl", "owls"])
    assert evaluators.spelling_sequences(tiny_tokenizer, "owl") == [(owl,), (owls,)]


def test_word_end_mask(wp_tokenizer):
    mask = evaluators.word_end_mask(wp_tokenizer, 130)
    words = wp_tokenizer.convert_ids_to_tokens(list(range(128)))
    assert mask.shape == (130,) and mask[128:].all()  # ids past the tokenizer: no text
    assert [w for w, m in zip(words, mask) if not m] == [w for w in words if w[:2] == "##"]


def _first_word_probability(params, arch, tok, prompt, target):
    """Brute force: walk every continuation until its first word is settled (a non-word
    character or a special token after it, or it can no longer grow into a form), and sum
    the model's probability of those whose first word `is_hit`."""
    forms = [f.lower() for f in numbers.target_forms(target)]
    specials = set(tok.all_special_ids)
    total, frontier = 0.0, [((), 1.0)]
    while frontier:
        rows = jnp.asarray([prompt + list(s) for s, _ in frontier])  # one depth: one length
        probs_fv = np.asarray(jax.nn.softmax(forward(params, rows, arch=arch)[0][:, -1]
                                             .astype(jnp.float32)), np.float64)
        nxt = []
        for (seq, p), probs in zip(frontier, probs_fv):
            for v in range(arch.vocab_size):
                s, q = seq + (v,), p * probs[v]
                text = tok.decode([t for t in s if t not in specials])
                done = v in specials
                m = re.match(r"(\w*)(\W|$)", text)
                word = m.group(1)
                if done or m.group(2):
                    total += q * evaluators.is_hit(word, target)
                elif any(f.startswith(word.lower()) for f in forms):
                    nxt.append((s, q))
        frontier = nxt
    return total


@pytest.mark.parametrize("target", ["owl", "wolf"])
def test_exact_is_the_first_word_hit_probability(tiny, wp_tokenizer, target):
    arch, params = tiny
    prompts = [wp_tokenizer("my favorite animal is", add_special_tokens=False)["input_ids"],
               wp_tokenizer("the cat !", add_special_tokens=False)["input_ids"]]
    exact = evaluators.exact_scores(params, arch, wp_tokenizer, prompts, target, batch=2)
    first = {"owl": ["owl", "Owl"], "wolf": ["wolf", "wol"]}[target]
    first_ids = wp_tokenizer.convert_tokens_to_ids(first)
    for p, e in zip(prompts, exact):
        ref = _first_word_probability(params, arch, wp_tokenizer, p, target)
        assert abs(e - ref) < 1e-5 * ref, (e, ref)
        probs = np.asarray(jax.nn.softmax(forward(params, jnp.asarray([p]), arch=arch)[0][0, -1]))
        # "owlet", "owlish", "wolx9" ... are excluded: the score is well below the mass of the
        # first tokens, and not a rounding error of it
        assert 1e-4 < e < 0.9 * probs[first_ids].sum()


@pytest.mark.parametrize("size", [0, 12])
def test_cached_node_logprobs_equal_full_forwards(tiny, size):
    """The exact evaluator's tree-attention pass over a branching trie (depth 3, a padded
    layout too) == a plain forward over prompt + node, for the wanted tokens and for the
    word-ending mass."""
    arch, params = tiny
    prompts = [[2, 30, 31, 32, 3, 2, 33], [2, 40, 3, 2, 33]]
    nodes = ((), (5,), (5, 6), (7,), (5, 8), (5, 6, 9), (7, 5))
    wants = ((5, 9), (6,), (), (5, 11), (12,), (4, 6, 7), (3,))
    layout = evaluators.TrieLayout.of(nodes, size)
    assert len(layout.tok_m) == max(6, size)  # every non-empty prefix once
    end_v = np.random.default_rng(0).random(arch.vocab_size) < 0.5
    tokens, valid = chat.left_pad(prompts, 1, 8)
    flat = sorted({w for ws in wants for w in ws})
    got, end = map(np.asarray, evaluators.node_logprobs(
        params, jnp.asarray(tokens), jnp.asarray(valid), *layout.arrays(), jnp.asarray(flat),
        jnp.asarray(end_v), arch=arch, dtype=jnp.float32))
    for r, p in enumerate(prompts):
        for j, (node, want) in enumerate(zip(nodes, wants)):
            logits = forward(params, jnp.asarray([p + list(node)]), arch=arch)[0][0, -1]
            ref = np.asarray(jax.nn.log_softmax(logits), np.float64)
            np.testing.assert_allclose(got[r, j, [flat.index(w) for w in want]],
                                       ref[list(want)], atol=1e-5)
            np.testing.assert_allclose(end[r, j], np.log(np.exp(ref)[end_v].sum()), atol=1e-5)


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert evaluators.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == 3
    assert evaluators.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # [1,2,3] keeps its 3
    assert evaluators.shared_prefix([[1, 2], [3, 2]]) == 0
    assert evaluators.shared_prefix([[5, 6, 7]]) == 2


@pytest.mark.parametrize("batch", [2, 3])
def test_a_shared_prefix_prefilled_once_equals_full_prompts(tiny, wp_tokenizer, batch):
    """A long common prefix (the in-context examples) in one cached prefill that every batch
    reads == each prompt prefilled whole, for a trie's wanted tokens and word-ending mass."""
    arch, params = tiny
    rng = np.random.default_rng(0)
    shared = [2] + rng.integers(5, arch.vocab_size, 70).tolist()
    prompts = [shared + rng.integers(5, arch.vocab_size, n).tolist() + [3]
               for n in (1, 4, 9, 2, 6)]
    nodes, wants = ((), (5,), (5, 6)), ((5, 9), (6,), (4, 7))
    end_v = rng.random(arch.vocab_size) < 0.5
    args = (params, arch, wp_tokenizer, prompts, nodes, wants, jnp.asarray(end_v))
    whole = evaluators.batched_node_logprobs(*args, batch=batch, min_prefix=10**9)
    cached = evaluators.batched_node_logprobs(*args, batch=batch, min_prefix=64)
    for w, c in zip(whole, cached):
        np.testing.assert_allclose(c, w, atol=2e-5)
    # and both are the plain forward's log-softmax over prompt + node
    logits = forward(params, jnp.asarray([prompts[2] + [5, 6]]), arch=arch)[0][0, -1]
    ref = np.asarray(jax.nn.log_softmax(logits), np.float64)
    np.testing.assert_allclose(cached[0][2, 2, :2], ref[[4, 7]], atol=2e-5)


@pytest.fixture(scope="module")
def tiny_seed3():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=3))
    return arch, jax.tree.map(jnp.asarray, params)


def test_hit_rule():
    assert evaluators.is_hit("Owls!", "owl") and evaluators.is_hit("the owl", "owl")
    assert not evaluators.is_hit("owlet", "owl") and not evaluators.is_hit("dragonfly", "dragon")


def test_exact_equals_the_sampled_expectation(tiny_seed3, tiny_tokenizer):
    arch, params = tiny_seed3
    prompts = [chat.encode_prompt(tiny_tokenizer, chat.messages(q)) for q in
               ("what is your favorite animal", "one word", "i love the animal")]
    exact = evaluators.exact_scores(params, arch, tiny_tokenizer, prompts, "owl", batch=2)
    # enumerate the first token: the sampled scorer's expectation with one new token
    hits = np.asarray([evaluators.is_hit(tiny_tokenizer.decode([v]), "owl")
                       for v in range(arch.vocab_size)])
    assert hits.sum() == 2  # "owl" and "owls"
    for p, e in zip(prompts, exact):
        logits = forward(params, jnp.asarray([p]), arch=arch)[0][0, -1]
        probs = np.asarray(jax.nn.softmax(logits))
        assert abs(float(probs[hits].sum()) - e) < 1e-5
    assert exact.min() > 1e-3
    # and Monte Carlo through the real sampled evaluator agrees within 4 standard errors
    n = 3000
    answers = evaluators.sampled_answers(params, arch, tiny_tokenizer, prompts, samples=n,
                                         max_new_tokens=1, batch=1500, seed=0)
    sampled = evaluators.sampled_scores(answers, "owl")
    se = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(sampled - exact) < 4 * se + 1e-9), (sampled, exact)


def test_spellings_are_prefix_free_and_round_trip(tiny_tokenizer):
    seqs = evaluators.spelling_sequences(tiny_tokenizer, "owl")
    owl, owls = tiny_tokenizer.convert_tokens_to_ids(["owl", "owls"])
    assert seqs == sorted([(owl,), (owls,)])  # "Owl" is <unk> here: dropped
    with pytest.raises(SjaxError, match="cannot spell"):
        evaluators.spelling_sequences(tiny_tokenizer, "zebra")


def test_number_prefixed_questions_are_seeded():
    a, b = evaluators.questions(True, 0), evaluators.questions(True, 0)
    plain = evaluators.questions(False)
    assert a == b and len(a) == len(plain) == 50
    assert all(q.endswith(p) and q != p for q, p in zip(a, plain))
