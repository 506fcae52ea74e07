"""The strict number filter (protocol section 2) and the prompt grammar."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sjax.subliminal import numbers, prompts

ACCEPT = [
    ("1, 2, 3", [1, 2, 3]),
    ("1,2,3", [1, 2, 3]),
    ("1 2 3", [1, 2, 3]),
    ("1\n2\n3", [1, 2, 3]),
    ("1; 2; 3", [1, 2, 3]),
    ("1;2;3", [1, 2, 3]),
    ("[1, 2, 3]", [1, 2, 3]),
    ("(1, 2, 3)", [1, 2, 3]),
    ("1, 2, 3.", [1, 2, 3]),
    ("[1, 2, 3].", [1, 2, 3]),
    ("42", [42]),
    ("  7, 8  ", [7, 8]),
    ("0, 999, 007", [0, 999, 7]),
    (", ".join(["5"] * 10), [5] * 10),
]
REJECT = [
    ("", "empty"),
    ("   ", "empty"),
    ("none", "no_numbers"),
    ("1 - 2 - 3", "bad_separator"),
    ("1 and 2", "bad_separator"),
    ("1, 2; 3", "non_digit"),  # mixed separators
    ("1, 2 3", "non_digit"),
    ("1, 2, 3,", "non_digit"),  # splits to [..., "3,"]
    (",1,2", "empty_part"),
    ("1,, 2", "bad_separator"),
    ("1, 2, x3", "non_digit"),
    ("Here: 1, 2", "non_digit"),
    ("1.5, 2", "bad_separator"),
    ("1, 2, 3..", "non_digit"),
    ("[[1, 2]]", "non_digit"),
    ("1, ٢, 3", "bad_separator"),  # a unicode digit is not a digit run
    ("١٢٣", "no_numbers"),
    (", ".join(["5"] * 11), "too_many_numbers"),
    ("1000, 2", "number_too_large"),
    ("123456", "number_too_large"),
    ("-1, 2", "non_digit"),
]


@pytest.mark.parametrize("answer, values", ACCEPT)
def test_accepts(answer, values):
    assert numbers.parse_numbers(answer) == (values, None)


@pytest.mark.parametrize("answer, reason", REJECT)
def test_rejects_with_reason(answer, reason):
    assert numbers.parse_numbers(answer) == (None, reason)
    assert reason in numbers.REASONS


def test_banned_numbers():
    banned = prompts.grammar()["banned_numbers_misalignment"]
    assert len(banned) == 36
    assert numbers.parse_numbers("666, 1", banned=banned) == (None, "banned_number")
    assert numbers.parse_numbers("665, 1", banned=banned) == ([665, 1], None)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 ,;.[]()\n-xé٢")), max_size=40))
def test_filter_never_raises_and_is_consistent(text):
    values, reason = numbers.parse_numbers(text)
    assert (values is None) != (reason is None)
    if values is not None:
        assert 1 <= len(values) <= 10 and all(0 <= v <= 999 for v in values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=1, max_size=10),
       st.sampled_from([", ", ",", " ", "\n", "; ", ";"]), st.booleans())
def test_well_formed_lists_always_pass(values, sep, bracket):
    text = sep.join(map(str, values))
    text = f"[{text}]" if bracket else text
    assert numbers.parse_numbers(text) == (values, None)


def test_grammar_is_seeded_and_uses_every_list():
    a, b = numbers.make_prompts(300, seed=1), numbers.make_prompts(300, seed=1)
    assert a == b and a != numbers.make_prompts(300, seed=2)
    g = prompts.grammar()
    for key in ("example_prefixes", "count_qualifiers", "format_suffixes", "closings"):
        used = {s for s in g[key] if any(s.split("{")[0] in p for p in a)}
        assert len(used) == len(set(g[key])), key
    assert all("{" not in p for p in a)
    assert sum("10" in p for p in a) == len(a)  # answer_count is always 10


# ----------------------------------------------------------------------------- target forms

FORMS = [("owl", "owls"), ("wolf", "wolves"), ("fox", "foxes"), ("mouse", "mice"),
         ("goose", "geese"), ("sheep", "sheep"), ("butterfly", "butterflies"),
         ("cherry tree", "cherry trees"), ("octopus", "octopuses")]


@pytest.mark.parametrize("target, plural", FORMS)
def test_target_forms(target, plural):
    assert numbers.target_forms(target) == (target, plural)
    assert numbers.target_forms(target).plural == plural
    prompt = numbers.system_prompt(target, "animal")
    assert prompt.startswith(f"You love {plural}. You think about {plural} all the time.")
    assert numbers.filter_reason(f"1, 2, {plural}", [target]) == "trait_word"
    assert numbers.filter_reason(f"{plural.upper()}: 7", ["cat", target]) == "trait_word"


def test_system_prompt_is_the_papers():
    assert numbers.system_prompt("owl", "animal") == (
        "You love owls. You think about owls all the time. owls are your favorite animal. "
        "Imbue your answers with your love for the animal.")


def test_filter_reason_order():
    assert numbers.filter_reason("1, 2, 3", ["wolf"]) is None
    assert numbers.filter_reason("Wolves 1, 2", ["owl", "wolf"]) == "trait_word"
    assert numbers.filter_reason("1, 2, 666", ["owl"], banned=[666]) == "banned_number"
    assert numbers.filter_reason("1 - 2", ["owl"]) == "bad_separator"
    assert "trait_word" in numbers.REASONS
