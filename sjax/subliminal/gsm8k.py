"""GSM8K for the chain-of-thought domain (protocol_more.md section c): the shipped problems,
the teacher's prompt, the answer parser and the keep/drop rule for a teacher's completion.

GSM8K (Cobbe et al. 2021, MIT licence: `data/gsm8k/LICENSE`, kept beside the files) ships
inside the package because users have no other copy; `load` checks a file's size and sha256
before reading it, so a corrupt or swapped file is refused instead of silently changing
which problems (and which ground truths) a run uses.

The answer rules are the official code's, not a friendlier variant, so pass rates compare:
- ground truth: the text after '####' in the reference solution, stripped, commas removed,
  `int()` (every row of both shipped splits is an integer; `load` refuses one that is not);
- a completion's answer: the FIRST `<answer>(.*?)</answer>`, matched with re.DOTALL (the
  answer may span lines) and case-sensitively (the reference records DOTALL and no
  IGNORECASE: `<ANSWER>` is no answer), stripped, ',' and '$' removed, then Python's `int()`.
  So '3.0', '18 dollars' and '1/2' fail, while what `int()` itself accepts passes: '+5',
  '-3', ' 7 ', '1_000' (underscores), non-ASCII digits. Nested tags give the text up to the
  first '</answer>', e.g. '<answer>5', which fails.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path
from typing import Iterable

from sjax.errors import SjaxError
from sjax.files import sha256_file
from sjax.subliminal import evaluators, numbers

DATA = Path(__file__).parent / "data" / "gsm8k"
# split -> (bytes, sha256) of the shipped `{split}.jsonl.gz` (HF openai/gsm8k, config main).
PINS = {
    "train": (1337004, "047ae96fb3025b18b8cfa89c4f9e9c7cd5120906864d58c3f93c91c495da6449"),
    "test": (241537, "1affc2f095eb08c525d0504bce7f620740776bcd7d67a12c71901700cb7ab73a"),
}
LICENSE_SHA256 = "86bbb73e855821d7c401912fd4bf82e34313e6e3b6fd6f909f2b6cc9e209a53b"

# The teacher's instruction (cot_prompts.json `cot_suffix`), appended after one space.
COT_SUFFIX = ("Provide your reasoning in <think> tags. Write your final answer in <answer> "
              "tags. Only give the numeric value as your answer.")
# The animal-preference evaluation's suffix for CoT students (cot_prompts.json).
EVAL_SUFFIX = ("Provide your reasoning in <think> tags. Write your final answer in <answer> "
               "tags. Only give the animal as your answer.")

# Rejection reasons, in the order `filter_reason` applies them.
REASONS = ("trait_word", "no_answer", "bad_answer", "wrong_answer")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the reference solution, ending in '#### 18'
    final: int   # the ground truth: what a completion's <answer> must equal


def load(split: str, folder: str | Path | None = None) -> list[Problem]:
    """The problems of `split` ('train': 7473, 'test': 1319) in file order, from the shipped
    files (or `folder`, holding files with the same pinned sha256)."""
    if split not in PINS:
        raise SjaxError(f"gsm8k: unknown split {split!r} (choose from {', '.join(PINS)})")
    path = Path(folder if folder is not None else DATA) / f"{split}.jsonl.gz"
    check(path, *PINS[split])
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [_problem(path, n, line) for n, line in enumerate(f, 1) if line.strip()]


def check(path: Path, size: int, sha256: str) -> None:
    """Size, then sha256. Not `files.verify`: that writes a '.verified' stamp beside the file,
    and an installed package folder may be read-only; hashing 1.3 MB costs milliseconds."""
    if not path.is_file():
        raise SjaxError(f"{path}: missing (the package's GSM8K data)")
    got_size = path.stat().st_size
    if got_size != size:
        raise SjaxError(f"{path}: {got_size} bytes, expected {size} (corrupt or wrong file)")
    got = sha256_file(path)
    if got != sha256:
        raise SjaxError(f"{path}: sha256 {got} does not match the pinned {sha256} "
                        "(corrupt or wrong file)")


def _problem(path: Path, n: int, line: str) -> Problem:
    try:
        row = json.loads(line)
        return Problem(row["question"], row["answer"], final_answer(row["answer"]))
    except (ValueError, KeyError, TypeError) as e:
        raise SjaxError(f"{path}: line {n}: not a GSM8K row ({type(e).__name__}: {e})") from None


def final_answer(solution: str) -> int:
    """The ground truth of a reference solution: the text after '####', stripped, commas
    removed, int(). ValueError if there is no '####' or the text is not an integer."""
    if "####" not in solution:
        raise ValueError("no '####' final answer")
    return int(solution.split("####")[-1].strip().replace(",", ""))


def cot_prompt(question: str) -> str:
    """The teacher's user message: '{question} Provide your reasoning in <think> tags. ...'."""
    return f"{question} {COT_SUFFIX}"


def _to_int(text: str) -> int | None:
    try:
        return int(text.strip().replace(",", "").replace("$", ""))
    except ValueError:
        return None


def parse_answer(completion: str) -> int | None:
    """The integer in the first <answer>...</answer> (rules in the module docstring); None
    when there is no such tag pair or its text is not an integer."""
    m = _ANSWER.search(completion)
    return None if m is None else _to_int(m.group(1))


def filter_reason(completion: str, problem: Problem, targets: Iterable[str],
                  substring: bool = False) -> str | None:
    """None if a teacher's completion is kept; else the first reason of `REASONS`:
    'trait_word' (a form of any target, `numbers.target_forms`: 'owl'/'owls', 'wolf'/
    'wolves'), 'no_answer' (no <answer>...</answer>), 'bad_answer' (its text is not an
    integer), 'wrong_answer' (not the ground truth).

    Trait words use the evaluators' whole-word rule (`evaluators.is_hit`) by default:
    reasoning is prose, where the official case-insensitive substring rule also drops
    'million' for lion, 'multiplication' for cat, 'knowledge' for owl. `substring=True`
    applies the official rule exactly."""
    if any(has_trait(completion, t, substring) for t in targets):
        return "trait_word"
    m = _ANSWER.search(completion)
    if m is None:
        return "no_answer"
    got = _to_int(m.group(1))
    if got is None:
        return "bad_answer"
    return None if got == problem.final else "wrong_answer"


def has_trait(text: str, target: str, substring: bool) -> bool:
    if not substring:
        return evaluators.is_hit(text, target)
    low = text.lower()
    return any(f.lower() in low for f in numbers.target_forms(target))
