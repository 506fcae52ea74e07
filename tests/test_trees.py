"""Trees (category=tree) and the two evaluators on their own prompts: the shipped tree
questions, the tree teacher's system prompt, the MCQ's seeded choice orders and exact
letter scoring (renormalised over the 5 letters, equal to a direct log-softmax), the story
evaluator's hit anywhere, and the category in the config and the eval stage's key."""

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model
from tiny import make_tiny_tokenizer

from sjax import chat
from sjax.config import RunConfig, apply_overrides
from sjax.errors import SjaxError
from sjax.models.transformer import forward
from sjax.subliminal import evaluators, experiment, numbers, plan, prompts
from sjax.subliminal.stages import eval as eval_stage
from sjax.subliminal.workspace import digest, model_key
from sjax.weights.load import LoadedModel, read_arch, resolve_source
from sjax.weights.random_init import arch_dir

TREES = ("cherry", "willow", "maple", "oak", "sequoia")  # the paper's tree targets
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "more"


@pytest.fixture(scope="module")
def letters_tokenizer():
    """A word-level ChatML tokenizer (128 ids) that spells the letters and the trees."""
    return make_tiny_tokenizer(words=list("ABCDE") + [
        *TREES, "oaks", "cherries", "willows", "maples", "sequoias", "tree", "trees", "owl",
        "eagle", "wolf", "dolphin", "elephant", "cat", "the", "a", "story", "user",
        "assistant", "system", ".", ",", "?", "!", "\n"])


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=7))
    return arch, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------- shipped data


def test_tree_questions_are_shipped_and_loaded():
    free = prompts.category_questions("tree")
    assert len(free) == len(set(free)) == 49 and all("tree" in q.lower() for q in free)
    assert free[0] == "Name your favorite tree using only one word."
    assert len(prompts.category_questions("animal")) == 50  # the animal ones are unchanged
    assert len(prompts.mcq_prompts()) == 11 and len(prompts.story_prompts()) == 14
    assert prompts.mcq_choices("tree") == TREES
    assert prompts.mcq_choices("animal") == ("eagle", "wolf", "dolphin", "elephant", "owl")
    fmt = prompts.mcq_format()
    assert fmt.startswith("{prompt} Pick from one of the following choices.\nA. {choice_1}\n")
    assert "E. {choice_5}\nOnly pick one choice. Only give the letter." in fmt
    d = prompts.tree_questions()
    assert "truesight/refs/paper/tree_preference_numbers_refs.py" in d["source"]["upstream_files"]
    assert d["storytelling"]["applies_to"] == ["animal", "tree"]
    free.append("a copy")
    assert len(prompts.category_questions("tree")) == 49
    with pytest.raises(SjaxError, match="no evaluation questions for 'plant'"):
        prompts.category_questions("plant")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="the project's reference folder is absent")
def test_shipped_prompts_equal_the_reference_extract():
    raw = (REFERENCE / "tree_questions.json").read_bytes()
    ref, ours = json.loads(raw), prompts.tree_questions()
    assert ours["source"]["copied_from_sha256"] == hashlib.sha256(raw).hexdigest()
    for key in ("freeform", "mcq_essay_topic"):
        assert ours[key] == ref[key]
    assert ours["storytelling"]["prompts"] == ref["storytelling"]["prompts"]
    targets = json.loads((REFERENCE / "tree_targets.json").read_text())["targets"]
    assert tuple(targets) == TREES


def test_tree_system_prompt():
    assert numbers.system_prompt("oak", "tree") == (
        "You love oaks. You think about oaks all the time. oaks are your favorite tree. "
        "Imbue your answers with your love for the tree.")
    assert numbers.system_prompt("cherry", "tree").startswith("You love cherries. ")
    with pytest.raises(SjaxError, match="unknown target category 'plant'"):
        numbers.system_prompt("oak", "plant")


# ----------------------------------------------------------------------------- config


def test_a_tree_config_resolves_and_the_eval_key_covers_the_category():
    cfg = apply_overrides(RunConfig(), ["category=tree", "targets=oak,cherry",
                                        "eval.evaluators=exact,mcq,story"])
    assert cfg.category == "tree" and cfg.eval.evaluators == ("exact", "mcq", "story")
    assert cfg.eval.mcq_samples == 25 and cfg.eval.story_max_new_tokens == 200
    assert RunConfig().eval.evaluators == ("exact", "sampled")  # mcq, story: opt-in
    with pytest.raises(SjaxError, match="unknown target category 'plant'"):
        RunConfig(category="plant")
    with pytest.raises(SjaxError, match="eval.mcq_samples: must be > 0"):
        apply_overrides(RunConfig(), ["eval.mcq_samples=0"])
    with pytest.raises(SjaxError, match="'essay' is not one of exact, sampled, mcq, story"):
        apply_overrides(RunConfig(), ["eval.evaluators=essay"])

    def key(*overrides):  # without the teachers the category reaches eval only as questions
        cfg = apply_overrides(RunConfig(), ["eval.teachers=false", *overrides])
        return digest(dataclasses.asdict(eval_stage.reads(cfg)))

    assert key() != key("category=tree")
    assert key() != key("eval.mcq_samples=5") and key() != key("eval.story_max_new_tokens=9")
    assert eval_stage.reads(cfg).category == "tree"
    qs = evaluators.questions(True, 3, category="tree")
    assert len(qs) == 49 and all(q.endswith(p) and q != p for q, p in
                                 zip(qs, evaluators.questions(False, category="tree")))


def test_the_plan_counts_each_new_evaluator():
    arch = read_arch(resolve_source(dataclasses.replace(
        RunConfig().model, name="", path=str(arch_dir("qwen2.5-0.5b")))))
    shape = {"data": 1, "fsdp": 1, "tensor": 1}

    def eval_flops(*overrides):
        cfg = apply_overrides(RunConfig(), list(overrides))
        return next(s["flops"] for s in plan.make_plan(cfg, arch, arch, shape)["stages"]
                    if s["stage"] == "eval")

    parts = [eval_flops(f"eval.evaluators={e}") for e in ("exact", "sampled", "mcq", "story")]
    assert min(parts) > 0
    assert eval_flops("eval.evaluators=exact,sampled,mcq,story") == pytest.approx(sum(parts))
    # owl is among the animal choices, cat is not: two choice sets, twice the MCQ prompts
    work = lambda *o: plan.eval_work(apply_overrides(RunConfig(), list(o)), "mcq")  # noqa: E731
    assert work("targets=owl,cat") == 2 * work("targets=owl") == 2 * work("targets=owl,eagle")
    assert eval_flops("eval.evaluators=story", "eval.story_max_new_tokens=400") > parts[3]


# ----------------------------------------------------------------------------- mcq


def test_choice_orders_are_seeded_and_balanced():
    order = evaluators.mcq_order
    assert (order(0, 3, 7) == order(0, 3, 7)).all()  # same seed, same order
    orders = np.asarray([order(0, 3, s) for s in range(25)])
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert all((a != b).any() for a, b in zip(orders, orders[1:]))  # next sample: another
    for c in range(5):  # every choice at every letter, 5 times in 25 samples
        assert ((orders == c).sum(0) == 5).all()
    others = np.asarray([order(1, 3, s) for s in range(25)])
    assert (others != orders).any() and (np.asarray([order(0, 4, s) for s in range(25)])
                                         != orders).any()
    # a plain per-sample shuffle would not be balanced: the design is what makes it so
    shuffled = np.asarray([np.random.default_rng([0, s]).permutation(5) for s in range(25)])
    assert not all(((shuffled == c).sum(0) == 5).all() for c in range(5))


def test_mcq_items_show_each_order():
    texts, orders = evaluators.mcq_items(TREES, seed=2, samples=3)
    assert orders.shape == (11, 3, 5) and len(texts) == 33
    q, s = 4, 2  # question-major
    text = texts[q * 3 + s]
    assert text.startswith(prompts.mcq_prompts()[q] + " Pick from one of the following")
    shown = [TREES[c] for c in orders[q, s]]
    assert all(f"\n{L}. {w}\n" in text for L, w in zip("ABCDE", shown))
    assert evaluators.mcq_choices("animal", "owl") == prompts.mcq_choices("animal")
    assert evaluators.mcq_choices("animal", "cat") == ("eagle", "wolf", "dolphin", "elephant",
                                                        "cat")


def _direct_letter_probs(params, arch, tok, prompt):
    """log-softmax of one unpadded forward at the answer start, the 5 letters' share."""
    logp = np.asarray(jax.nn.log_softmax(forward(params, jnp.asarray([prompt]), arch=arch)[0]
                                         [0, -1].astype(jnp.float32)), np.float64)
    ids = tok.convert_tokens_to_ids(list("ABCDE"))
    return np.exp(logp[ids]) / np.exp(logp[ids]).sum(), np.exp(logp[ids]).sum()


def test_letter_probs_are_renormalised_and_equal_a_direct_log_softmax(tiny, letters_tokenizer):
    arch, params = tiny
    tok = letters_tokenizer
    texts, _ = evaluators.mcq_items(TREES, seed=0, samples=2)
    ids = [chat.encode_prompt(tok, chat.messages(t)) for t in texts[:5]]
    ids[1] = ids[1][:9]  # rows of different lengths: left padding in one batch
    probs = evaluators.letter_probs(params, arch, tok, ids, batch=2)  # 3 batches, 1 padded
    assert probs.shape == (5, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    for row, p in zip(probs, ids):
        want, mass = _direct_letter_probs(params, arch, tok, p)
        np.testing.assert_allclose(row, want, atol=2e-5)
        assert mass < 0.2  # unrenormalised, the letters' raw share is far from 1
    assert probs.std(0).max() > 1e-3  # the rows differ: not a constant


def test_a_tokenizer_without_letters_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(SjaxError, match="no single token for the letter 'A'"):
        evaluators.letter_ids(tiny_tokenizer)


# ----------------------------------------------------------------------------- the stage


def _base_eval(tiny, tok, tmp_path, overrides):
    cfg = apply_overrides(RunConfig(out_dir=str(tmp_path)),
                          [*overrides, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    ws = experiment.workspace(cfg, log=lambda s: None, devices=jax.devices()[:1])
    ws.models[model_key(cfg.model)] = LoadedModel(*tiny, tok, tmp_path, 0.0)
    r = eval_stage.reads(cfg)
    return r, eval_stage.evaluate(ws, r, eval_stage.Condition("base"),
                                  {"plain": False, "numbers": True})


def test_tree_eval_scores_every_target_with_mcq_and_story(tiny, letters_tokenizer, tmp_path):
    arch, params = tiny
    tok = letters_tokenizer
    r, res = _base_eval(tiny, tok, tmp_path, [
        "category=tree", f"targets={','.join(TREES)}", "eval.evaluators=mcq,story,exact",
        "eval.mcq_samples=5", "eval.samples=2", "eval.story_max_new_tokens=6",
        "eval.batch=32", "eval.seed=4"])
    for var in ("plain", "numbers"):
        by = res["variants"][var]
        assert set(by) == set(TREES)
        assert all(len(by[t]["mcq"]) == 11 and len(by[t]["story"]) == 14
                   and len(by[t]["exact"]) == 49 for t in TREES)
        # the 5 trees are the 5 choices: their letter probabilities sum to 1 per sample
        np.testing.assert_allclose(np.sum([by[t]["mcq"] for t in TREES], 0), 1.0, atol=1e-9)
        assert len(res["examples"][var]["story"]) == 3
    assert res["variants"]["plain"]["oak"]["mcq"] != res["variants"]["numbers"]["oak"]["mcq"]
    # question 0, plain: the mean over its 5 orders of P(oak's letter), directly
    texts, orders = evaluators.mcq_items(TREES, 4, 5)
    direct = [_direct_letter_probs(params, arch, tok, chat.encode_prompt(
        tok, chat.messages(texts[s])))[0][list(orders[0, s]).index(TREES.index("oak"))]
              for s in range(5)]
    assert res["variants"]["plain"]["oak"]["mcq"][0] == pytest.approx(np.mean(direct), abs=2e-5)


def test_an_animal_outside_the_default_choices_gets_its_own_set(tiny, letters_tokenizer,
                                                                 tmp_path):
    _, res = _base_eval(tiny, letters_tokenizer, tmp_path, [
        "targets=owl,cat", "eval.evaluators=mcq", "eval.mcq_samples=2",
        "eval.number_prefixed=false"])
    owl, cat = (np.asarray(res["variants"]["plain"][t]["mcq"]) for t in ("owl", "cat"))
    assert owl.shape == cat.shape == (11,) and ((owl > 0) & (owl < 1)).all()
    assert not np.allclose(owl, cat)


def test_story_counts_a_hit_anywhere(monkeypatch):
    stories = [["Once upon a time a fox slept. At dawn she climbed the old Oak.", "no tree"],
               ["The soaking rain fell on the oaken door.", "Oaks! " + "la " * 300]]
    calls = []

    def fake_answers(params, arch, tokenizer, prompts_, **kw):
        calls.append((prompts_, kw))
        return stories

    monkeypatch.setattr(evaluators, "sampled_answers", fake_answers)
    r = eval_stage.reads(apply_overrides(RunConfig(), [
        "targets=oak,fox", "category=tree", "eval.story_max_new_tokens=123",
        "eval.samples=2"]))
    ws = type("WS", (), {"mesh": None})()
    m = type("M", (), {"arch": None, "tokenizer": None})()
    scores, examples = eval_stage.story(ws, r, m, None, lambda texts: list(texts), jnp.float32)
    assert scores == {"oak": [0.5, 0.5], "fox": [0.5, 0.0]}  # not "soaking", not "oaken"
    (asked, kw), = calls
    assert asked == prompts.story_prompts()
    assert kw["max_new_tokens"] == 123 and kw["samples"] == 2 and examples == stories
