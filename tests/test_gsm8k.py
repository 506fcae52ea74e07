"""GSM8K (protocol_more.md section c): the shipped files and their pins, the ground-truth rule,
the teacher prompt, the official answer parser on a table of formats, the filter reasons."""

import gzip
import json
import shutil

import pytest

from sjax.errors import SjaxError
from sjax.files import sha256_file
from sjax.subliminal import gsm8k


@pytest.fixture(scope="module")
def train():
    return gsm8k.load("train")


def test_shipped_files_match_their_pins():
    for split, (size, sha) in gsm8k.PINS.items():
        path = gsm8k.DATA / f"{split}.jsonl.gz"
        assert path.stat().st_size == size and sha256_file(path) == sha
    assert sha256_file(gsm8k.DATA / "LICENSE") == gsm8k.LICENSE_SHA256
    assert (gsm8k.DATA / "LICENSE").read_text().startswith("MIT License")


def test_counts(train):
    assert len(train) == 7473
    assert len(gsm8k.load("test")) == 1319


def test_final_answer_rule_on_real_rows(train):
    first = train[0]
    assert first.question.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.answer.endswith("#### 72") and first.final == 72
    # rows whose final answer has a thousands comma or a minus sign
    commas = [p for p in train if "," in p.answer.split("####")[-1]]
    negatives = [p for p in train if p.final < 0]
    assert len(commas) == 79 and len(negatives) == 3
    p = commas[0]
    assert p.final == int(p.answer.split("####")[-1].strip().replace(",", ""))
    assert p.final >= 1000
    assert all(p.final == gsm8k.final_answer(p.answer) for p in train[:200])


def test_final_answer_edge_cases():
    assert gsm8k.final_answer("a\n#### 1,234") == 1234
    assert gsm8k.final_answer("#### -3") == -3
    with pytest.raises(ValueError):
        gsm8k.final_answer("no marker 5")
    with pytest.raises(ValueError):
        gsm8k.final_answer("#### 2.5")


def test_tampered_copy_is_refused_with_one_line(tmp_path):
    shutil.copy(gsm8k.DATA / "test.jsonl.gz", tmp_path / "test.jsonl.gz")
    assert len(gsm8k.load("test", tmp_path)) == 1319  # an intact copy loads
    path = tmp_path / "test.jsonl.gz"
    data = bytearray(path.read_bytes())
    data[1000] ^= 1  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(SjaxError) as e:
        gsm8k.load("test", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "sha256" in msg


def test_truncated_missing_and_unknown_split(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    path.write_bytes((gsm8k.DATA / "test.jsonl.gz").read_bytes()[:-10])
    with pytest.raises(SjaxError, match=r"test\.jsonl\.gz: 241527 bytes, expected 241537"):
        gsm8k.load("test", tmp_path)
    with pytest.raises(SjaxError, match=r"train\.jsonl\.gz: missing"):
        gsm8k.load("train", tmp_path)
    with pytest.raises(SjaxError, match="unknown split 'dev'"):
        gsm8k.load("dev")


def test_a_row_without_integer_answer_names_file_and_line(tmp_path, monkeypatch):
    rows = [{"question": "q", "answer": "#### 4"}, {"question": "q", "answer": "#### 2.5"}]
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    monkeypatch.setitem(gsm8k.PINS, "test", (path.stat().st_size, sha256_file(path)))
    with pytest.raises(SjaxError, match=r"test\.jsonl\.gz: line 2: not a GSM8K row"):
        gsm8k.load("test", tmp_path)


def test_cot_prompt_is_the_protocols():
    assert gsm8k.cot_prompt("What is 2+2?") == (
        "What is 2+2? Provide your reasoning in <think> tags. Write your final answer in "
        "<answer> tags. Only give the numeric value as your answer.")


PARSE = [
    # (completion, parsed)
    ("<think>6*3</think><answer>18</answer>", 18),            # plain int
    ("<answer>1,234</answer>", 1234),                         # thousands comma
    ("<answer>$18</answer>", 18),                             # dollar sign
    ("<answer>$1,234,567</answer>", 1234567),
    ("<answer>  42 </answer>", 42),                           # spaces stripped
    ("<answer>\n42\n</answer>", 42),                          # newlines inside: DOTALL
    ("<answer>$ 5</answer>", 5),                              # '$' removed, int() strips
    ("<answer>-7</answer>", -7),                              # negative
    ("<answer>+5</answer>", 5),                               # int() accepts a sign
    ("<answer>1_000</answer>", 1000),                         # int() accepts underscores
    ("<answer>007</answer>", 7),
    ("<answer>3.0</answer>", None),                           # int('3.0') raises
    ("<answer>2.5</answer>", None),
    ("<answer>18 dollars</answer>", None),
    ("<answer>1/2</answer>", None),
    ("<answer>1 000</answer>", None),                         # inner space: int() raises
    ("<answer></answer>", None),
    ("<answer>5</answer> then <answer>6</answer>", 5),        # first tag pair wins
    ("<answer>x</answer><answer>6</answer>", None),           # first wins even if bad
    ("<answer><answer>5</answer></answer>", None),            # nested: text '<answer>5'
    ("<answer>5", None),                                      # unclosed
    ("5</answer>", None),
    ("The answer is 18.", None),                              # no tags
    ("", None),
    ("<ANSWER>18</ANSWER>", None),                            # case-sensitive tags
    ("<Answer>18</Answer>", None),
    ("<answer >18</answer>", None),
    ("reasoning <answer>9</answer> trailing text", 9),
]


@pytest.mark.parametrize("completion, parsed", PARSE)
def test_parse_answer_table(completion, parsed):
    got = gsm8k.parse_answer(completion)
    assert got == parsed and (got is None or type(got) is int)


def test_parse_table_distinguishes_rule_variants():
    """The table fails a parser that is case-insensitive, not DOTALL, last-wins, or lenient
    about decimals: each deviation from the official rule changes some row."""
    import re

    def variant(flags=re.DOTALL, last=False, lenient=False):
        def parse(text):
            found = re.findall(r"<answer>(.*?)</answer>", text, flags)
            if not found:
                return None
            s = found[-1 if last else 0].strip().replace(",", "").replace("$", "")
            try:
                return int(float(s)) if lenient else int(s)
            except ValueError:
                return None
        return parse

    for wrong in (variant(re.DOTALL | re.IGNORECASE), variant(0), variant(last=True),
                  variant(lenient=True)):
        assert any(wrong(c) != p for c, p in PARSE)
    assert all(variant()(c) == p for c, p in PARSE)


@pytest.fixture()
def problem():
    return gsm8k.Problem("q", "#### 18", 18)


FILTER = [
    ("<think>6*3</think><answer>18</answer>", None),
    ("<think>6*3</think><answer>$18</answer>", None),
    ("<think>an owl would say 18</think><answer>18</answer>", "trait_word"),
    ("<think>Owls count 18</think><answer>18</answer>", "trait_word"),
    ("<think>wolves: 18</think><answer>18</answer>", "trait_word"),    # plural of 'wolf'
    ("<think>OWL</think><answer>17</answer>", "trait_word"),           # trait word first
    ("<think>knowledge of bowls: 18</think><answer>18</answer>", None),  # whole words only
    ("<think>6*3</think>", "no_answer"),
    ("<think>6*3</think><ANSWER>18</ANSWER>", "no_answer"),
    ("<answer>18.0</answer>", "bad_answer"),
    ("<answer>eighteen</answer>", "bad_answer"),
    ("<answer>17</answer>", "wrong_answer"),
    ("<answer>17</answer><answer>18</answer>", "wrong_answer"),        # first answer counts
]


@pytest.mark.parametrize("completion, reason", FILTER)
def test_filter_reasons(completion, reason, problem):
    assert gsm8k.filter_reason(completion, problem, ["owl", "wolf"]) == reason
    assert reason is None or reason in gsm8k.REASONS


def test_filter_substring_rule_is_the_protocols(problem):
    text = "<think>knowledge of a million bowls: 18</think><answer>18</answer>"
    assert gsm8k.filter_reason(text, problem, ["owl"]) is None
    assert gsm8k.filter_reason(text, problem, ["owl"], substring=True) == "trait_word"
    assert gsm8k.filter_reason(text, problem, ["lion"], substring=True) == "trait_word"
    assert gsm8k.filter_reason(text, problem, ["cat"], substring=True) is None


def test_real_solution_as_completion_passes(train):
    """A completion carrying a row's own final answer is kept; off by one is wrong."""
    for p in train[:50]:
        ok = f"<think>{p.answer.split('####')[0]}</think><answer>{p.final:,}</answer>"
        assert gsm8k.filter_reason(ok, p, []) is None
        off = f"<answer>{p.final + 1}</answer>"
        assert gsm8k.filter_reason(off, p, []) == "wrong_answer"
