"""Teacher training questions (disjoint from the evaluation's 50) and the questions-file reader."""

import json

import pytest

from sjax.errors import SjaxError
from sjax.subliminal import prompts

EVAL = prompts.eval_prompts()["animal_questions"]


def _shared_8grams(questions, against):
    """Every (question, shared 8-gram) pair: what the disjointness test asserts is empty."""
    seen = set().union(*(prompts.ngrams(q) for q in against))
    return [(q, g) for q in questions for g in sorted(prompts.ngrams(q) & seen)]


def test_ngrams_normalises_and_counts():
    want = ("what", "s", "your", "one", "word", "answer")
    assert prompts.words("What's your ONE-word   answer?!") == want
    assert prompts.ngrams("a b c", 2) == {("a", "b"), ("b", "c")}
    assert prompts.ngrams("a b c", 4) == set()
    assert len(prompts.ngrams(" ".join(map(str, range(20))))) == 13  # 20 - 8 + 1
    same = prompts.ngrams("If you could, be ANY animal", 3)
    assert same == prompts.ngrams("if you could be any-animal", 3) and len(same) == 4


def test_teacher_questions_shape():
    d = prompts.load("teacher_questions.json")
    assert "disjoint" in d["description"] and set(d) == {"description", "animal_questions"}
    qs = prompts.teacher_questions()
    assert len(qs) >= 100 and len(EVAL) == 50
    assert all(isinstance(q, str) and q.strip() == q and q for q in qs)
    assert len({prompts.words(q) for q in qs}) == len(qs)  # unique even after normalisation
    qs.append("mutating the copy")
    assert len(prompts.teacher_questions()) == len(qs) - 1  # a copy, not the cached list


def test_teacher_questions_disjoint_from_eval():
    qs = prompts.teacher_questions()
    assert not {prompts.words(q) for q in qs} & {prompts.words(q) for q in EVAL}
    assert _shared_8grams(qs, EVAL) == []


def test_disjointness_check_can_fail():
    leaked = "Quick one: " + EVAL[6].upper().replace(",", " -")  # a reworded copy of an eval item
    hits = _shared_8grams([*prompts.teacher_questions(), leaked], EVAL)
    assert hits and {q for q, _ in hits} == {leaked}
    assert ("if", "you", "could", "be", "any", "animal", "which", "would") in {g for _, g in hits}
    assert prompts.words(EVAL[0] + " ") == prompts.words(EVAL[0].lower().rstrip("."))


def _write(tmp_path, text, name="qs.json"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("obj", [
    [" Best animal? ", "Worst animal?"],
    {"description": "mine", "questions": ["Best animal?\n", "Worst animal?"]},
])
def test_questions_file_accepts_both_shapes(tmp_path, obj):
    p = _write(tmp_path, json.dumps(obj))
    assert prompts.questions_file(p) == ["Best animal?", "Worst animal?"]
    assert prompts.questions_file(str(p)) == ["Best animal?", "Worst animal?"]


@pytest.mark.parametrize("text, says", [
    ('["a",\n  "b"', "not JSON (line 2, column"),
    ("[1, 2", "not JSON (line 1"),
    ("", "not JSON (line 1, column 1"),
    ("42", "got a JSON number"),
    ('"what is your favourite animal?"', "got a JSON string"),
    ('{"animal_questions": ["a"]}', 'without a list under "questions" (keys: animal_questions)'),
    ('{"questions": "a"}', 'without a list under "questions"'),
    ("[]", "question list is empty"),
    ('{"questions": []}', "question list is empty"),
    ('["a", 3]', "question 1 is a JSON number, not a string"),
    ('["a", "b", null]', "question 2 is a JSON null, not a string"),
    ('["a", ["b"]]', "question 1 is a JSON array, not a string"),
    ('["a", ""]', "question 1 is empty"),
    ('["   \\n\\t", "a"]', "question 0 is empty"),
    ('["a", "b", "a", "b"]', "question 2 duplicates question 0: 'a'"),
    ('["a", "b", " b "]', "question 2 duplicates question 1: 'b'"),
])
def test_questions_file_rejects(tmp_path, text, says):
    p = _write(tmp_path, text, name="my_questions.json")
    with pytest.raises(SjaxError) as e:
        prompts.questions_file(p)
    msg = str(e.value)
    assert "my_questions.json" in msg and says in msg and "\n" not in msg, msg


def test_questions_file_missing_and_unreadable(tmp_path):
    with pytest.raises(SjaxError, match=r"nope\.json: not found"):
        prompts.questions_file(tmp_path / "nope.json")
    (tmp_path / "qdir").mkdir()
    with pytest.raises(SjaxError, match=r"qdir: cannot read"):
        prompts.questions_file(tmp_path / "qdir")
    (tmp_path / "latin1.json").write_bytes(b'["caf\xe9"]')
    with pytest.raises(SjaxError, match=r"latin1\.json: cannot read"):
        prompts.questions_file(tmp_path / "latin1.json")
