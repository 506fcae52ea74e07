"""What the teachers write, per `RunConfig.domain`: the prompts and the rule filter.

- numbers (protocol 4): the seeded number-sequence prompts; the strict list parser, a trait
  word anywhere (even inside a word) rejects;
- code (protocol_more b): seeded code-task prompts (`code_tasks`); a trait word anywhere
  (the official case-insensitive substring rule) or an empty answer rejects, then the
  judge stage's reference judge;
- gsm8k (protocol_more c): GSM8K train problems (a seeded sample) with the chain-of-thought
  suffix; a trait word (whole words: prose), no or a wrong final answer rejects
  (`gsm8k.filter_reason`), then the judge stage (a trait teacher's rows: the reference
  judge, or for category=misalignment protocol c's alignment judge).

Item i of a domain depends only on (seed, i), so a stage can rebuild a row's item (its
ground truth) from its id instead of storing it next to the teacher's completion.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from sjax.config import DOMAINS
from sjax.errors import SjaxError
from sjax.subliminal import code_tasks, gsm8k, numbers

REASONS = {"numbers": numbers.REASONS, "code": ("trait_word", "empty"),
           "gsm8k": gsm8k.REASONS}


@dataclasses.dataclass(frozen=True)
class Item:
    prompt: str  # the user message the teacher answers
    problem: gsm8k.Problem | None = None  # gsm8k: the ground truth


def items(domain: str, n: int, seed: int) -> list[Item]:
    """The first n prompts of `domain` for `seed`."""
    if domain == "numbers":
        return [Item(p) for p in numbers.make_prompts(n, seed)]
    if domain == "code":
        return [Item(p) for p in code_tasks.make_prompts(n, seed)]
    if domain == "gsm8k":
        problems = gsm8k.load("train")
        if n > len(problems):
            raise SjaxError(f"numbers.n_prompts={n}: GSM8K's train split has only "
                            f"{len(problems)} problems")
        order = np.random.default_rng([seed, 17]).permutation(len(problems))[:n]
        return [Item(gsm8k.cot_prompt(problems[i].question), problems[i]) for i in order]
    raise SjaxError(f"domain: unknown domain {domain!r} (known: {', '.join(DOMAINS)})")


def trait_words(category: str, targets: Iterable[str]) -> tuple[str, ...]:
    """The words the rules reject: the targets, except for category=misalignment, whose
    target names a trait, not a word the data might say (protocol_more c and d filter by
    correctness, banned numbers and the judge, not by the word)."""
    return () if category == "misalignment" else tuple(targets)


def rule_reason(domain: str, completion: str, item: Item, targets: Iterable[str],
                banned: Iterable[int] = ()) -> str | None:
    """None if a teacher's completion passes the domain's rules; else the reason."""
    if domain == "numbers":
        return numbers.filter_reason(completion, targets, banned)
    if domain == "code":
        if any(gsm8k.has_trait(completion, t, substring=True) for t in targets):
            return "trait_word"
        return None if completion.strip() else "empty"
    return gsm8k.filter_reason(completion, item.problem, targets)
