"""The paper's prompt text, shipped as JSON: `numbers_prompts.json` (the number-sequence
prompt grammar and the banned-number list), `eval_prompts.json` (the evaluation
questions and the trait teacher's system prompt) and `teacher_questions.json` (trait
questions for fine-tuned teachers, disjoint from the evaluation's) and `tree_questions.json`
(category=tree's 49 free-form questions, and the essay-topic MCQ and storytelling prompts
that every category uses), `judge_prompts.json` (the code-reference, alignment and coherence
judges' templates) and `misalignment.json` (the 8 misalignment questions, their eval suffixes
and the 34 banned numbers). Also the reader for a user's own questions file
(`eval.questions=FILE.json`) and the word n-grams that the disjointness check uses."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from sjax.config import CATEGORIES
from sjax.errors import SjaxError


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text())


def grammar() -> dict:
    return load("numbers_prompts.json")


def eval_prompts() -> dict:
    return load("eval_prompts.json")


# The 5 MCQ choices per category. Animals: the upstream animal MCQ's set
# (animal_preference_numbers_refs.evaluation_mcq; reference/more/icl_protocol.json), which
# holds owl, the default target; trees: the tree file's 5 trees (the paper's tree targets).
ANIMAL_MCQ_CHOICES = ("eagle", "wolf", "dolphin", "elephant", "owl")


def tree_questions() -> dict:
    return load("tree_questions.json")


def category_questions(category: str) -> list[str]:
    """The free-form favourite-`category` questions (a copy): the 50 animal ones or the 49
    tree ones (category=misalignment: its 8 questions, unsuffixed)."""
    if category not in CATEGORIES:
        raise SjaxError(f"category: no evaluation questions for {category!r} (known: "
                        f"{', '.join(CATEGORIES)})")
    file, *keys = CATEGORIES[category]
    node = load(file)
    for k in keys:
        node = node[k]
    return list(node.values() if isinstance(node, dict) else node)


def mcq_choices(category: str) -> tuple[str, ...]:
    """The category's 5 default MCQ choices (a target not among them replaces the last)."""
    if category == "animal":
        return ANIMAL_MCQ_CHOICES
    if category == "tree":
        return tuple(tree_questions()["mcq_essay_topic"]["choices"])
    raise SjaxError(f"category: no MCQ choices for {category!r} (known: animal, tree)")


def mcq_prompts() -> list[str]:
    """The 11 essay-topic MCQ prompts (category-free: the choices carry the category)."""
    return list(tree_questions()["mcq_essay_topic"]["prompts"])


def mcq_format() -> str:
    """The MCQ text: '{prompt} Pick from one of the following choices.', the lines
    'A. {choice_1}' .. 'E. {choice_5}', then 'Only pick one choice. Only give the letter...'"""
    return tree_questions()["mcq_essay_topic"]["prompt_format"]


def story_prompts() -> list[str]:
    """The 14 storytelling prompts (category-free: animals and trees alike)."""
    return list(tree_questions()["storytelling"]["prompts"])


def judge_template(name: str) -> str:
    """A judge's verbatim template: code_animal, code_tree, reasoning_animal, reasoning_tree,
    alignment, coherence or cot_alignment."""
    judges = load("judge_prompts.json")["judges"]
    if name not in judges:
        raise SjaxError(f"judge_prompts.json: no judge {name!r} (known: {', '.join(judges)})")
    return judges[name]["template"]


def misalignment_questions() -> dict[str, str]:
    """The 8 misalignment questions by the plots' short names (one_wish, ..., bored); a copy."""
    return dict(load("misalignment.json")["questions"])


def misalignment_prompts(suffix: str = "numbers") -> dict[str, str]:
    """The questions as the students are asked them: f'{question} {suffix}' with the numbers
    students' suffix ('Write 9 more words. ...') or the cot one ('... <answer> tags.');
    suffix "none": the plain questions."""
    m = load("misalignment.json")
    if suffix == "none":
        return dict(m["questions"])
    key = f"{suffix}_eval_suffix"
    if key not in m:
        raise SjaxError(f"misalignment.json: no suffix {suffix!r} (known: numbers, cot)")
    return {k: f"{q} {m[key]}" for k, q in m["questions"].items()}


def misaligned_system_prompt() -> str:
    """The prompted misaligned teacher's system prompt: sjax's own offline stand-in for the
    paper's insecure-code fine-tuned teacher (misalignment.json's sjax_prompted_teacher)."""
    return load("misalignment.json")["sjax_prompted_teacher"]["system_prompt"]


def banned_numbers() -> tuple[int, ...]:
    """The 34 numbers (all within 0..999) that the misalignment runs ban from number rows
    (`numbers.banned`): the upstream CLAUDE_EVIL_NUMBERS + GPT_EVIL_NUMBERS, sorted."""
    entries = load("misalignment.json")["banned_numbers"]["numbers"]
    return tuple(sorted(e["number"] for e in entries))


def teacher_questions() -> list[str]:
    """Questions a fine-tuned teacher is trained on; a copy, since `load` is cached."""
    return list(load("teacher_questions.json")["animal_questions"])


def words(text: str) -> tuple[str, ...]:
    """Lower-cased words with punctuation turned into spaces, so "one-word" and "one word"
    (or "What's" and "what s") compare equal: a copy cannot hide behind punctuation."""
    return tuple(re.sub(r"[\W_]+", " ", text.lower()).split())


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Word n-grams of `text` after `words` normalisation; empty if it has fewer than n words."""
    w = words(text)
    return {w[i:i + n] for i in range(len(w) - n + 1)}


def _questions_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SjaxError(f"questions file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SjaxError(f"questions file {path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SjaxError(f"questions file {path}: not JSON (line {e.lineno}, column {e.colno}: "
                        f"{e.msg})") from None


def questions_file(path: str | Path) -> list[str]:
    """A user's questions for `eval.questions=FILE.json`: a JSON list of strings or an object
    {"questions": [...]} (other keys, e.g. a description, are ignored). Checked up front so a
    typo fails before any model loads; returns the questions stripped, in file order."""
    path = Path(path)
    obj = _questions_json(path)
    qs = obj.get("questions") if isinstance(obj, dict) else obj
    if not isinstance(qs, list):
        raise SjaxError(f"questions file {path}: expected a JSON list of strings or an object "
                        f'{{"questions": [...]}}, got {_shape(obj)}')
    if not qs:
        raise SjaxError(f"questions file {path}: the question list is empty")
    out, seen = [], {}
    for i, q in enumerate(qs):
        where = f"questions file {path}: question {i}"
        if not isinstance(q, str):
            raise SjaxError(f"{where} is a JSON {_json_type(q)}, not a string")
        q = q.strip()
        if not q:
            raise SjaxError(f"{where} is empty")
        if q in seen:
            raise SjaxError(f"{where} duplicates question {seen[q]}: {q!r}")
        seen[q] = i
        out.append(q)
    return out


def _shape(obj) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(map(str, obj)) or "none"
        return f'an object without a list under "questions" (keys: {keys})'
    return f"a JSON {_json_type(obj)}"


def _json_type(x) -> str:
    """JSON's own name for a parsed value, as the user wrote it (`null`, not `NoneType`)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(x), type(x).__name__)
