"""The paper's prompt text, shipped as JSON: `numbers_prompts.json` (the number-sequence
prompt grammar and the banned-number list) and `eval_prompts.json` (the evaluation
questions and the trait teacher's system prompt)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text())


def grammar() -> dict:
    return load("numbers_prompts.json")


def eval_prompts() -> dict:
    return load("eval_prompts.json")
