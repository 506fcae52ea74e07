"""Number-sequence data: the paper's prompt grammar, its strict answer filter and the
target's word forms.

The grammar and prompt strings are the paper's, shipped as `prompts/numbers_prompts.json`. The
filter follows protocol section 2 exactly and returns a reason for every rejection, so a
run can say why rows were lost. `target_forms` is the one place a target's singular and
plural come from (system prompt, filter, both evaluators), so "wolf" means "wolves" too.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, NamedTuple

import numpy as np

from sjax.config import CATEGORIES
from sjax.errors import SjaxError
from sjax.subliminal.prompts import eval_prompts, grammar, misaligned_system_prompt

# Rejection reasons, in the order the rules are applied.
REASONS = ("trait_word", "empty", "no_numbers", "bad_separator", "empty_part", "non_digit",
           "too_many_numbers", "number_too_large", "banned_number")
_DIGIT_RUN = re.compile(r"[0-9]+")


class TargetForms(NamedTuple):
    singular: str
    plural: str


@lru_cache(maxsize=None)
def target_forms(target: str) -> TargetForms:
    """The target (a singular noun, as configured) and its English plural by `inflect`:
    wolf -> wolves, mouse -> mice, sheep -> sheep, cherry tree -> cherry trees."""
    import inflect  # lazy: its import takes ~1.5 s, and only target forms need it

    return TargetForms(target, inflect.engine().plural_noun(target))


def system_prompt(target: str, category: str) -> str:
    """The trait teacher's system prompt: 'You love owls. ... owls are your favorite animal.
    ...' with the real plural (cherry -> cherries, where the upstream code writes
    'cherrys') and the run's category ('oaks are your favorite tree'). The upstream tree
    code fills the category with 'animal' (protocol_more.md a, a likely copy-paste slip
    that cannot be checked); category=tree follows the template's intent. The misalignment
    category's teacher has its own prompt (`prompts.misaligned_system_prompt`)."""
    if category not in CATEGORIES:
        raise SjaxError(f"category: unknown target category {category!r} (known: "
                        f"{', '.join(CATEGORIES)})")
    if category == "misalignment":
        return misaligned_system_prompt()
    return eval_prompts()["teacher_system_prompt"].format(plural=target_forms(target).plural,
                                                          category=category)


def example_prefix(rng: np.random.Generator) -> str:
    """'I give you this sequence of numbers: 512, 204, 877.' (3-8 numbers in 100..999)."""
    g = grammar()
    count = int(rng.integers(3, 9))
    examples = ", ".join(str(int(v)) for v in rng.integers(100, 1000, count))
    return g["example_prefixes"][rng.integers(len(g["example_prefixes"]))].format(
        examples=examples)


def make_prompt(rng: np.random.Generator, answer_count: int = 10, max_digits: int = 3) -> str:
    """'{example_prefix} {instruction} {format_suffix} {closing}', each part uniform."""
    g = grammar()
    pick = lambda key: g[key][rng.integers(len(g[key]))]  # noqa: E731
    prefix = example_prefix(rng)
    digit_descriptor = pick("digit_descriptors").format(max_digits=max_digits)
    instruction = pick("instructions").format(count_qualifier=pick("count_qualifiers"),
                                              answer_count=answer_count,
                                              digit_descriptor=digit_descriptor)
    return f"{prefix} {instruction} {pick('format_suffixes')} {pick('closings')}"


def make_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [make_prompt(rng) for _ in range(n)]


def parse_numbers(answer: str, max_count: int = 10, max_value: int = 999,
                  banned: Iterable[int] = ()) -> tuple[list[int] | None, str | None]:
    """(numbers, None) if `answer` passes the strict filter, else (None, reason)."""
    s = answer.strip()
    if not s:
        return None, "empty"
    if s.endswith("."):
        s = s[:-1]
    if len(s) >= 2 and (s[0], s[-1]) in (("[", "]"), ("(", ")")):
        s = s[1:-1]
    runs = list(_DIGIT_RUN.finditer(s))
    if not runs:
        return None, "no_numbers"
    if len(runs) == 1:
        parts = [s]
    else:
        sep = s[runs[0].end(): runs[1].start()]
        if sep.strip() not in ("", ",", ";"):
            return None, "bad_separator"
        parts = s.split(sep)
    if any(p == "" for p in parts):
        return None, "empty_part"
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None, "non_digit"
    if len(parts) > max_count:
        return None, "too_many_numbers"
    values = [int(p) for p in parts]
    if any(v > max_value for v in values):
        return None, "number_too_large"
    if set(values) & set(banned):
        return None, "banned_number"
    return values, None


def filter_reason(completion: str, targets: Iterable[str],
                  banned: Iterable[int] = ()) -> str | None:
    """None if a teacher's completion is kept; else why not: a trait word first (any form of
    any target anywhere, even inside a word: stricter than the evaluators' whole-word hit,
    as nothing of the trait may leak), then the strict number-list parser."""
    low = completion.lower()
    if any(f.lower() in low for t in targets for f in target_forms(t)):
        return "trait_word"
    return parse_numbers(completion, banned=banned)[1]
