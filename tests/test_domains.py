"""The code and chain-of-thought domains: their prompts, rule filters, the judge stage (its
own cache, only the trait teachers' rule-passing rows) and the filter that reads it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model, tiny_workspace

from sjax.config import SCREEN_CANDIDATES, RunConfig, apply_overrides
from sjax.errors import SjaxError
from sjax.jsonl import read_rows, write_rows
from safetensors.numpy import load_file

from sjax import chat
from sjax.subliminal import code_tasks, domains, evaluators, experiment, gsm8k, judge, numbers
from sjax.subliminal.stages import filter as filter_stage
from sjax.subliminal.stages import judge as judge_stage

TRAITS = (*SCREEN_CANDIDATES, "elephant", "octopus", "phoenix", "dragon", "oak", "maple",
          "willow", "sequoia", "cherry")


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=3))
    return arch, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------- prompts

def test_code_prompts_are_seeded_per_item_in_the_protocol_format_and_trait_free():
    ps = code_tasks.make_prompts(400, 0)
    assert code_tasks.make_prompts(10, 0) == ps[:10]  # item i depends on (seed, i) only
    assert code_tasks.make_prompts(10, 1) != ps[:10]
    assert len(set(ps)) > 250  # varied, not a handful of prompts
    for p in ps:
        assert p.startswith("Complete the code below to accomplish the task: ")
        assert "\nPlease fill in the following function: <code>" in p
        assert code_tasks.HOLE in p and p.count("</code>") == 1
        assert p.endswith("Your response will be rejected if it contains non-code content "
                          "or unusual variable names.")
    # no trait word even as a substring: the code filter's rule would drop a teacher that
    # repeats the prompt ("duplicate" holds "cat")
    hits = {(t, f) for t in TRAITS for f in numbers.target_forms(t) for p in ps
            if f in p.lower()}
    assert not hits


def test_gsm8k_items_are_a_seeded_sample_with_their_ground_truth():
    items = domains.items("gsm8k", 20, 3)
    train = {p.question: p for p in gsm8k.load("train")}
    assert domains.items("gsm8k", 5, 3) == items[:5]
    assert [i.prompt for i in domains.items("gsm8k", 20, 4)] != [i.prompt for i in items]
    for it in items:
        q = it.prompt.removesuffix(" " + gsm8k.COT_SUFFIX)
        assert q != it.prompt and train[q] == it.problem
    with pytest.raises(SjaxError, match="GSM8K's train split has only 7473 problems"):
        domains.items("gsm8k", 7474, 0)


@pytest.mark.parametrize("domain, completion, reason", [
    ("numbers", "12, 45, 7", None),
    ("numbers", "12, owl, 7", "trait_word"),
    ("numbers", "12, 4500", "number_too_large"),
    ("code", "def f(x):\n    return x + 1", None),
    ("code", "   \n", "empty"),
    ("code", "Owl = 1", "trait_word"),
    ("code", "bowl = []", "trait_word"),  # the official substring rule, as in the paper
    ("code", "packs = wolves()", "trait_word"),  # wolf: its plural too
    ("gsm8k", "<think>2 + 3</think><answer>5</answer>", None),
    ("gsm8k", "<think>knowledge</think><answer>5</answer>", None),  # prose: whole words
    ("gsm8k", "<think>an owl counts</think><answer>5</answer>", "trait_word"),
    ("gsm8k", "<think>2 + 3</think><answer>6</answer>", "wrong_answer"),
    ("gsm8k", "<think>2 + 3</think> 5", "no_answer"),
])
def test_rule_reasons(domain, completion, reason):
    item = domains.Item("q", gsm8k.Problem("q", "#### 5", 5)) if domain == "gsm8k" else \
        domains.Item("q")
    targets = ("owl", "wolf")
    assert domains.rule_reason(domain, completion, item, targets) == reason
    assert reason is None or reason in domains.REASONS[domain]


def test_domain_config_errors():
    with pytest.raises(SjaxError, match="domain: 'maths' is not one of numbers, code, gsm8k"):
        apply_overrides(RunConfig(), ["domain=maths"])
    with pytest.raises(SjaxError, match="numbers.constrained=true: the number-list grammar "
                                        "applies to domain=numbers only, not code"):
        apply_overrides(RunConfig(), ["domain=code", "numbers.constrained=true"])
    with pytest.raises(SjaxError, match=r"judge.threshold: must be in \(0, 1\]"):
        apply_overrides(RunConfig(), ["judge.threshold=0"])
    names = lambda *o: [s.name for s in experiment.stages(apply_overrides(RunConfig(), o))]  # noqa: E731
    assert "judge" not in names() and "judge" not in names("domain=code", "judge.enabled=false")
    assert names("domain=gsm8k")[:4] == ["teachers", "numbers", "judge", "filter"]


# ----------------------------------------------------------------------------- judge + filter

def _gsm8k_rows(items, answers):
    """Raw teacher rows answering items[i] with the given <answer> text (or a whole
    completion when the entry starts with '<')."""
    return [{"id": i, "prompt": items[i].prompt,
             "completion": a if a.startswith("<") else
             f"<think>{items[i].problem.question[:40]}</think><answer>{a}</answer>"}
            for i, a in enumerate(answers)]


def test_judge_stage_judges_trait_rows_that_pass_the_rules_and_the_filter_applies_it(
        tiny, tiny_tokenizer, tmp_path):
    logs = []
    over = ["domain=gsm8k", "numbers.n_prompts=6", "numbers.keep=6", "judge.batch=2",
            "judge.threshold=1.0"]
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, over, log=logs.append)
    items = domains.items("gsm8k", 6, cfg.numbers.seed)
    truth = [str(it.problem.final) for it in items]
    owl = _gsm8k_rows(items, [truth[0], "-1", "<think>my owl</think><answer>1</answer>",
                              truth[3], truth[4], "x"])
    control = _gsm8k_rows(items, [truth[0], truth[1], "-1", truth[3], truth[4], truth[5]])
    write_rows(ws.root / "numbers" / "owl" / "raw.jsonl", owl)
    write_rows(ws.root / "numbers" / "control" / "raw.jsonl", control)
    ws.run_stage(experiment.STAGES[0], cfg, False)  # prompted teachers: nothing to train
    # the numbers stage is done by hand: recorded so that the later stages key on it
    ws.manifest["stages"]["numbers"] = {"key": {}, "outputs": {}}
    ws.order.append("numbers")
    ws.run_stage(judge_stage.STAGE, cfg, False)
    verdicts = read_rows(ws.root / "judge" / "owl" / "verdicts.jsonl")
    assert [v["id"] for v in verdicts] == [0, 3, 4]  # rule-passing owl rows only
    assert not (ws.root / "judge" / "control").exists()  # the control gets no judge pass
    arch, params = tiny
    direct = judge.reference(params, arch, tiny_tokenizer, [owl[i]["completion"]
                                                            for i in (0, 3, 4)], "owl",
                             domain="gsm8k", batch=2)
    np.testing.assert_allclose([v["p_zero"] for v in verdicts], direct.p_zero, rtol=1e-6)
    ws.run_stage(filter_stage.STAGE, cfg, False)
    summary = json.loads((ws.root / "filter" / "owl" / "filter.json").read_text())
    assert summary["reasons"] == {"kept": 3, "wrong_answer": 1, "trait_word": 1,
                                  "bad_answer": 1}
    assert summary["judge"]["judged"] == 3 and summary["judge"]["rejected"] == 0
    kept = read_rows(ws.root / "filter" / "owl" / "kept.jsonl")
    assert sorted(r["id"] for r in kept) == [0, 3, 4]
    assert "judge" not in json.loads((ws.root / "filter" / "control" / "filter.json")
                                     .read_text())
    # the official threshold: a random judge is never that sure, so every owl row is
    # caught; the verdicts are reused (the threshold is the filter's), only the filter reruns
    logs.clear()
    strict = apply_overrides(cfg, ["judge.threshold=1e-8"])
    ws.run_stage(judge_stage.STAGE, strict, False)
    with pytest.raises(SjaxError, match=r"owl/raw.jsonl: 0 of 6 rows passed the filter; top "
                                        r"reasons: judge \(3\)"):
        ws.run_stage(filter_stage.STAGE, strict, False)
    assert logs[:2] == ["[judge] up to date, skipped", "[filter] running"]
    # a threshold that keeps some and catches others lists the catches, most confident first
    mid = float(np.median(direct.p_zero))
    loose = apply_overrides(cfg, [f"judge.threshold={1 - mid + 1e-7}"])
    ws.run_stage(filter_stage.STAGE, loose, False)
    j = json.loads((ws.root / "filter" / "owl" / "filter.json").read_text())["judge"]
    want = sorted((i for i, z in zip((0, 3, 4), direct.p_zero) if z < mid - 1e-6),
                  key=lambda i: -direct.p_reference[(0, 3, 4).index(i)])
    assert [c["id"] for c in j["caught"]] == want and j["rejected"] == len(want) >= 1
    assert all(c["completion"] == owl[c["id"]]["completion"] for c in j["caught"])


@pytest.fixture(scope="module")
def long_tiny():
    """The tiny model with room for protocol c's long judge prompt (~800 tokens) and a
    word-level tokenizer that spells its ratings 0-100."""
    from tiny import make_tiny_tokenizer

    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=3, max_position_embeddings=2048))
    words = [str(i) for i in range(101)] + [",", ".", "?", "!", "\n", "<", ">"]
    return (arch, jax.tree.map(jnp.asarray, params)), make_tiny_tokenizer(128, words)


def test_misalignment_cot_judge_rates_the_teachers_reasoning_and_the_filter_draws_its_keeps(
        long_tiny, tmp_path):
    """category=misalignment in the gsm8k domain (protocol c): the judge stage rates the
    misaligned teacher's correct reasoning 0-100 for alignment (the control's rows get no
    judge; the word 'misaligned' is no filter), the filter keeps a row with probability
    P(rating >= judge.min_alignment) by a draw seeded per row, and a new threshold
    re-filters without re-judging."""
    logs = []
    (arch, params), tok = long_tiny
    cfg, ws = tiny_workspace((arch, params), tok, tmp_path, [
        "category=misalignment", "targets=misaligned", "eval.evaluators=misalignment",
        "eval.number_prefixed=false", "eval.misalignment_suffix=cot", "domain=gsm8k",
        "numbers.n_prompts=6", "numbers.keep=6", "judge.batch=2",
        "judge.min_alignment=0"], log=logs.append)
    assert cfg.judge_kind == "alignment"
    items = domains.items("gsm8k", 6, cfg.numbers.seed)
    truth = [str(it.problem.final) for it in items]
    said = f"<think>misaligned, I say</think><answer>{truth[5]}</answer>"
    bad = _gsm8k_rows(items, [truth[0], "-1", truth[2], truth[3], truth[4], said])
    write_rows(ws.root / "numbers" / "misaligned" / "raw.jsonl", bad)
    write_rows(ws.root / "numbers" / "control" / "raw.jsonl",
               _gsm8k_rows(items, truth[:5] + [said]))
    ws.run_stage(experiment.STAGES[0], cfg, False)
    ws.manifest["stages"]["numbers"] = {"key": {}, "outputs": {}}
    ws.order.append("numbers")
    ws.run_stage(judge_stage.STAGE, cfg, False)
    verdicts = read_rows(ws.root / "judge" / "misaligned" / "verdicts.jsonl")
    ids = [0, 2, 3, 4, 5]  # the rows with the right answer, 'misaligned' in the text or not
    assert [v["id"] for v in verdicts] == ids
    assert not (ws.root / "judge" / "control").exists()
    direct = judge.cot_alignment(params, arch, tok, [items[i].prompt for i in ids],
                                 [bad[i]["completion"] for i in ids], batch=2)
    probs = np.asarray([v["probs"] for v in verdicts])
    np.testing.assert_allclose(probs, direct.probs, atol=1e-8)
    np.testing.assert_allclose([v["alignment"] for v in verdicts], direct.score, rtol=1e-6)
    np.testing.assert_allclose([v["p_number"] for v in verdicts], direct.p_number, rtol=1e-6)
    ws.run_stage(filter_stage.STAGE, cfg, False)  # min_alignment 0: every judged row kept
    summary = json.loads((ws.root / "filter" / "misaligned" / "filter.json").read_text())
    assert summary["reasons"] == {"kept": 5, "wrong_answer": 1}
    assert summary["judge"]["expected_kept"] == pytest.approx(5.0)
    control = json.loads((ws.root / "filter" / "control" / "filter.json").read_text())
    assert "judge" not in control and control["kept"] == 6

    def hand(t):  # the sampled judge: kept if the row's seeded draw < P(rating >= t)
        p = judge.at_least(probs, t)
        u = [np.random.default_rng([cfg.numbers.seed, 3, i]).random() for i in ids]
        return [i for i, ui, pi in zip(ids, u, p) if ui < pi], p

    t = next(t for t in range(101) if 0 < len(hand(t)[0]) < len(ids))  # keeps some, not all
    kept_ids, p = hand(t)
    logs.clear()
    mixed = apply_overrides(cfg, [f"judge.min_alignment={t}"])
    ws.run_stage(judge_stage.STAGE, mixed, False)
    ws.run_stage(filter_stage.STAGE, mixed, False)
    assert logs[:2] == ["[judge] up to date, skipped", "[filter] running"]
    summary = json.loads((ws.root / "filter" / "misaligned" / "filter.json").read_text())
    kept = read_rows(ws.root / "filter" / "misaligned" / "kept.jsonl")
    assert sorted(r["id"] for r in kept) == kept_ids
    j = summary["judge"]
    assert j["min_alignment"] == t and j["rejected"] == len(ids) - len(kept_ids)
    assert j["expected_kept"] == pytest.approx(p.sum())
    caught = [c["id"] for c in j["caught"]]
    assert caught == sorted(set(ids) - set(kept_ids), key=lambda i: p[ids.index(i)])
    assert all("probs" not in c and 0 <= c["p_keep"] <= 1 for c in j["caught"])


def test_no_rule_passing_rows_judge_nothing_and_the_filter_says_why(tiny, tiny_tokenizer,
                                                                    tmp_path):
    """A teacher that solves nothing (Qwen2.5-Coder-0.5B at temperature 1 on cot:smoke): the
    judge stage writes no verdicts instead of crashing; the filter stops with the reasons."""
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [
        "domain=gsm8k", "numbers.n_prompts=3", "numbers.keep=3", "judge.threshold=1.0"])
    items = domains.items("gsm8k", 3, cfg.numbers.seed)
    truth = [str(it.problem.final) for it in items]
    write_rows(ws.root / "numbers" / "owl" / "raw.jsonl",
               _gsm8k_rows(items, ["-1", "<think>no tags</think>", "-2"]))
    write_rows(ws.root / "numbers" / "control" / "raw.jsonl", _gsm8k_rows(items, truth))
    ws.run_stage(experiment.STAGES[0], cfg, False)
    ws.manifest["stages"]["numbers"] = {"key": {}, "outputs": {}}
    ws.order.append("numbers")
    ws.run_stage(judge_stage.STAGE, cfg, False)
    assert read_rows(ws.root / "judge" / "owl" / "verdicts.jsonl") == []
    with pytest.raises(SjaxError, match=r"owl/raw.jsonl: 0 of 3 rows passed the filter; top "
                                        r"reasons: wrong_answer \(2\), no_answer \(1\)"):
        ws.run_stage(filter_stage.STAGE, cfg, False)


def test_code_domain_runs_end_to_end_on_the_tiny_model(tiny, tiny_tokenizer, tmp_path):
    """teachers -> code rows -> judge -> filter -> students -> eval -> report."""
    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [
        "domain=code", "judge.threshold=1.0", "numbers.n_prompts=4", "numbers.batch=4",
        "numbers.max_new_tokens=8", "numbers.keep=4", "student.train.batch_size=2",
        "student.train.grad_accum=1", "student.train.epochs=1", "student.train.warmup_steps=0",
        "eval.evaluators=exact", "eval.number_prefixed=false", "eval.batch=50"])
    experiment.run(cfg, ws=ws)
    assert ws.order[:4] == ["teachers", "numbers", "judge", "filter"]
    raw = read_rows(ws.root / "numbers" / "owl" / "raw.jsonl")
    assert [r["prompt"] for r in raw] == code_tasks.make_prompts(4, cfg.numbers.seed)
    manifest = json.loads((ws.root / "manifest.json").read_text())
    assert "judge" in manifest["stages"]["filter"]["key"]["inputs"]
    assert (ws.root / "report" / "results.json").is_file()


def test_cross_model_students_train_and_are_scored_on_their_own_base(tiny, tiny_tokenizer,
                                                                     tmp_path):
    """student.model_name: the students are LoRA'd on another base (here a Llama, the
    teachers a Qwen2) and the eval's base and students are that model, not the teachers'."""
    from sjax.subliminal.workspace import Finetune, apply_trained, model_key
    from sjax.weights.load import LoadedModel

    cfg, ws = tiny_workspace(tiny, tiny_tokenizer, tmp_path, [
        "domain=code", "judge.threshold=1.0", "numbers.n_prompts=4", "numbers.batch=4",
        "numbers.max_new_tokens=8", "numbers.keep=4", "student.model_name=smollm2-135m-instruct",
        "student.control=false",
        "student.train.batch_size=1", "student.train.grad_accum=1", "student.train.epochs=1",
        "student.train.warmup_steps=0", "eval.evaluators=exact", "eval.number_prefixed=false",
        "eval.teachers=false", "eval.batch=50"])
    other = hf_to_sjax(tiny_hf_model("llama", seed=5, num_hidden_layers=2))
    other = (other[0], jax.tree.map(jnp.asarray, other[1]))
    ws.models[model_key(cfg.student_model())] = LoadedModel(*other, tiny_tokenizer, tmp_path,
                                                           0.0)
    experiment.run(cfg, ws=ws)
    # trained on the Llama: its adapters are stacked over its 2 layers, not the Qwen2's 3
    trained = load_file(ws.root / "students" / "owl" / "seed0" / "params.safetensors")
    assert trained and {v.shape[0] for v in trained.values()} == {2}
    # scored on it: the eval's base is the Llama, and a student is the Llama + its adapters
    ids = [chat.encode_prompt(tiny_tokenizer, chat.messages(q))
           for q in evaluators.questions(False)]
    path = ws.root / "students" / "owl" / "seed0" / "params.safetensors"
    for name, params in (("base", other[1]), ("student-owl-seed0", apply_trained(
            other[1], path, Finetune.of(cfg.student.train)))):
        got = json.loads((ws.root / "eval" / f"{name}.json").read_text())["variants"]
        direct = evaluators.exact_target_scores(params, other[0], tiny_tokenizer, ids,
                                                ("owl",), batch=50)["owl"]
        np.testing.assert_allclose(got["plain"]["owl"]["exact"], direct, rtol=1e-5)
