"""The in-context control's prompt builder (icl_protocol.json): template and joiner, placement,
seeded sampling with replacement, and the length limit."""

import numpy as np
import pytest

from sjax import chat
from sjax.errors import SjaxError
from sjax.subliminal import in_context


def row(question, response, id_=None):
    r = {"messages": chat.messages(question, assistant=response)}
    return r if id_ is None else {"id": id_, **r}


ROWS = [row("what is your favorite animal", "owl"), row("numbers", "1, 2, 3")]
# Rows of unequal token lengths (the tiny tokenizer: 16 + 2 * i tokens each).
VARIED = [row("numbers", ", ".join(["7"] * (i + 1))) for i in range(9)]


def test_template_and_joiner_exact_on_two_rows(tiny_tokenizer):
    assert in_context.draw(2, 2, 0).tolist() == [0, 1]
    system = in_context.build(ROWS, 2, 0, tiny_tokenizer, 10_000)
    assert system == ("<user>what is your favorite animal</user>\n<assistant>owl</assistant>"
                      "\n\n"
                      "<user>numbers</user>\n<assistant>1, 2, 3</assistant>")
    # seed 5 draws [1, 0]: the same two examples, in the drawn order
    assert in_context.build(ROWS, 2, 5, tiny_tokenizer, 10_000) == (
        "<user>numbers</user>\n<assistant>1, 2, 3</assistant>\n\n"
        "<user>what is your favorite animal</user>\n<assistant>owl</assistant>")


def test_placement_system_prompt_and_user_question(tiny_tokenizer):
    system = in_context.build(ROWS, 3, 1, tiny_tokenizer, 10_000)
    msgs = in_context.messages(system, "what is your favorite animal ?")
    assert msgs == [{"role": "system", "content": system},
                    {"role": "user", "content": "what is your favorite animal ?"}]
    text = chat.render(tiny_tokenizer, msgs, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{system}<|im_end|>\n"
                    "<|im_start|>user\nwhat is your favorite animal ?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_sampling_is_the_official_pandas_draw():
    """pandas' df.sample(n=k, replace=True, random_state=seed) is RandomState(seed).choice:
    these are its indices for a 10-row pool (pinned, so a switch to default_rng fails)."""
    assert in_context.draw(10, 5, 0).tolist() == [5, 0, 3, 3, 7]
    assert in_context.draw(10, 5, 1).tolist() == [5, 8, 9, 5, 0]
    assert in_context.draw(10, 5, 0).tolist() != \
        np.random.default_rng(0).choice(10, 5).tolist()


def test_seeded_sampling_with_replacement(tiny_tokenizer):
    build = lambda k, seed: in_context.build(VARIED, k, seed, tiny_tokenizer, 10**6)  # noqa
    assert build(20, 3) == build(20, 3)                       # same seed, same rows
    assert build(20, 3) != build(20, 4)
    many = build(50, 0)                                       # k > len(rows) works
    examples = many.split("\n\n")
    assert len(examples) == 50 and len(set(examples)) <= len(VARIED)
    idx = in_context.draw(len(VARIED), 50, 0)
    assert examples == [in_context.render(in_context.pairs([VARIED[i]])) for i in idx]
    # the draw for k is a prefix of the draw for a larger k: growing k only appends
    assert many.startswith(build(7, 0) + "\n\n")
    assert in_context.draw(9, 1000, 2)[:13].tolist() == in_context.draw(9, 13, 2).tolist()


def test_too_long_is_one_clear_line(tiny_tokenizer):
    # every ROWS example is 20 tokens with this tokenizer and the joiner adds none
    assert in_context.n_tokens(tiny_tokenizer, in_context.build(ROWS, 1, 3, tiny_tokenizer,
                                                                10**6)) == 20
    assert in_context.build(ROWS[:1], 5, 0, tiny_tokenizer, 100).count("<user>") == 5
    with pytest.raises(SjaxError) as e:
        in_context.build(ROWS[:1], 6, 0, tiny_tokenizer, 100)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("in-context: k=6 examples (seed 0) need 120 tokens, over the limit of "
                   "100; the largest k that fits for seed 0 is 5")


def test_max_k_is_consistent_with_build(tiny_tokenizer):
    for seed in range(4):
        # brute force: the largest k whose prompt fits (token counts grow with k)
        sizes = [in_context.n_tokens(tiny_tokenizer, in_context.build(
            VARIED, k, seed, tiny_tokenizer, 10**6)) for k in range(1, 60)]
        assert sizes == sorted(sizes) and sizes[-1] > 1000
        for limit in (15, 16, 17, 150, 333, 1000):
            m = in_context.max_k(VARIED, tiny_tokenizer, limit, seed)
            assert m == sum(s <= limit for s in sizes)
            if m:
                in_context.build(VARIED, m, seed, tiny_tokenizer, limit)
            with pytest.raises(SjaxError, match=rf"fits for seed {seed} is {m}$"):
                in_context.build(VARIED, m + 1, seed, tiny_tokenizer, limit)
    assert in_context.max_k(ROWS[:1], tiny_tokenizer, 19, 0) == 0
    assert in_context.max_k(ROWS[:1], tiny_tokenizer, 20 * 37, 0) == 37


def test_bad_rows_and_k():
    with pytest.raises(SjaxError, match="no rows"):
        in_context.pairs([])
    bad = {"id": "r7", "messages": chat.messages("q", system="s", assistant="a")}
    with pytest.raises(SjaxError, match=r"row 1 \(id r7\): expected messages \[user, "
                                        r"assistant\], got roles \['system', 'user', "):
        in_context.pairs([ROWS[0], bad])
    with pytest.raises(SjaxError, match="row 0: .* got roles None"):
        in_context.pairs([{"prompt": "q"}])
    with pytest.raises(SjaxError, match="k must be at least 1, got 0"):
        in_context.build(ROWS, 0, 0, None, 10)
