"""`sjax screen` on the tiny model: the row KL against a numpy reference, the entangled-number
log-ratios against direct log-softmaxes (one token and, through the cached trie, two; with
the end-of-number term where digits are tokens of their own), the command's outputs, its
questions file and its one-line errors."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model
from tiny import CHATML

from sjax import chat, cli, sharding
from sjax.config import ScreenConfig
from sjax.errors import SjaxError
from sjax.models.transformer import forward
from sjax.subliminal import screen
from sjax.weights.load import LoadedModel, param_shardings

SYSTEM = "i love owls . owls is your favorite animal"
PROMPTS = ["what is your favorite numbers ?", "in one word , the numbers", "a numbers , what ?"]


@pytest.fixture(scope="module")
def tiny():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=7))
    return arch, jax.tree.map(jnp.asarray, params)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _rows(tok):
    """Three rows of different prompt and completion lengths, ending in the stop token."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    comps = [_ids(tok, "12 , 7 , 33") + [end], _ids(tok, "5") + [end],
             _ids(tok, "1 , 2 , 3 , 4 , 5") + [end]]
    return screen.Rows(PROMPTS, comps, ["", "", ""], None)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnames="arch")
def _forward(params, tokens_bt, arch):
    return forward(params, tokens_bt, arch=arch)[0]


def _logits(params, arch, ids):
    """Unpadded full-sequence logits [t, v] of one row."""
    return np.asarray(_forward(params, jnp.asarray([ids]), arch)[0])


def test_row_kl_is_zero_for_the_base_and_matches_numpy(tiny, tiny_tokenizer):
    arch, params = tiny
    rows = _rows(tiny_tokenizer)
    kl = screen.RowKL(params, arch, tiny_tokenizer, rows, batch=2, dtype=jnp.float32)
    same, counts = kl.per_row("")  # the teacher is the base: same prompt, same model
    assert counts.tolist() == [len(c) for c in rows.completions] == [6, 2, 10]
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    sums, _ = kl.per_row(SYSTEM)
    assert (sums > 1e-3).all()

    # numpy: full forwards of the two unpadded rows, KL at the completion positions
    def ref(r, shift=0, reverse=False):
        comp = rows.completions[r]
        seqs = [chat.encode_prompt(tiny_tokenizer, chat.messages(PROMPTS[r], s)) for s in
                (SYSTEM, "")]
        lps = [_log_softmax(_logits(params, arch, p + comp))[len(p) - 1 + shift:][:len(comp)]
               for p in seqs]
        t, b = lps[::-1] if reverse else lps
        return float((np.exp(t) * (t - b)).sum())

    for r in range(3):
        assert sums[r] == pytest.approx(ref(r), rel=1e-4, abs=1e-6)
    assert sums[0] != pytest.approx(ref(0, shift=-1), rel=1e-2)  # off by one: caught
    assert sums[0] != pytest.approx(ref(0, reverse=True), rel=1e-2)  # KL(base || teacher)
    per_token = sums.sum() / counts.sum()
    assert per_token == pytest.approx(sum(ref(r) for r in range(3)) / 18, rel=1e-4)


def test_number_trie_sums_each_numbers_tokens_and_its_end():
    trie = screen.NumberTrie({5: (10,), 12: (11, 12), 17: (11, 13)})
    # nodes: (), (10,), (11,), (11, 12), (11, 13): every prefix and every whole number
    assert trie.node_len.tolist() == [0, 1, 1, 2, 2] and trie.want_w.tolist() == [10, 11, 12, 13]
    assert trie.end_node.tolist() == [1, 3, 4]
    rng = np.random.default_rng(0)
    lp, end = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5))  # [prompts, nodes, (wants)]
    want = np.stack([lp[:, 0, 0] + end[:, 1], lp[:, 0, 1] + lp[:, 2, 2] + end[:, 3],
                     lp[:, 0, 1] + lp[:, 2, 3] + end[:, 4]], 1)
    np.testing.assert_allclose(trie.logp(lp, end), want)


def test_entangled_log_ratio_equals_direct_log_softmax(tiny, tiny_tokenizer):
    arch, params = tiny
    tok = tiny_tokenizer
    seqs = screen.number_sequences(tok)
    assert sorted(seqs) == list(range(100))  # "100".."999" are unknown to the tiny vocab
    seven, four, five = tok.convert_tokens_to_ids(["7", "4", "5"])
    assert seqs[7] == (seven,)
    # a two-token "number" goes through the cached node path: log P(4) + log P(5 | 4)
    trie = screen.NumberTrie({7: (seven,), 45: (four, five)})
    ids = {s: [chat.encode_prompt(tok, chat.messages(p, s)) for p in PROMPTS]
           for s in (SYSTEM, "")}
    lp = {s: screen.number_logprobs(params, arch, tok, trie, ids[s], dtype=jnp.float32,
                                    rows_per_call=4)  # 2 prompts per call: a padded last call
          for s in ids}
    ratio = (lp[SYSTEM] - lp[""]).mean(0)

    def direct(s, i):
        p = ids[s][i]
        one = _log_softmax(_logits(params, arch, p)[-1])
        two = _log_softmax(_logits(params, arch, p + [four])[-1])
        return one[seven], one[four] + two[five]

    want = np.mean([np.subtract(direct(SYSTEM, i), direct("", i)) for i in range(3)], 0)
    np.testing.assert_allclose(ratio, want, rtol=1e-4, atol=1e-5)
    assert abs(ratio[1] - np.mean([direct(SYSTEM, i)[0] - direct("", i)[0]
                                   for i in range(3)])) > 1e-3  # "4" alone is not "45"


def _digit_tokenizer():
    """A character-level ChatML tokenizer that decodes without spaces: "45" is the two
    tokens "4" "5", as in Qwen's, so "4" is a prefix of "45" and "450"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = list("0123456789abcdefghijklmnopqrstuvwxyz ,.?!\n:'")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + chars)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", chat_template=CHATML)


def test_a_number_excludes_the_numbers_it_is_a_prefix_of(tiny):
    """P(the first number is 4) = P("4") * P(a token that ends the number | "4"): "45" and
    "450" are other numbers. The end set is written out here: every id but the digit and
    letter characters (',', ' ', EOS, ... and ids the tokenizer lacks)."""
    arch, params = tiny
    tok = _digit_tokenizer()
    seqs = screen.number_sequences(tok)
    assert len(seqs) == 1000 and seqs[45] == (*seqs[4], *seqs[5]) and len(seqs[450]) == 3
    trie = screen.NumberTrie({n: seqs[n] for n in (4, 45, 450, 7)})
    ends = np.ones(arch.vocab_size, bool)
    ends[[i for w, i in tok.get_vocab().items() if re.fullmatch(r"[0-9a-z]", w)]] = False
    ids = {s: [chat.encode_prompt(tok, chat.messages(p, s)) for p in PROMPTS]
           for s in (SYSTEM, "")}
    lp = {s: screen.number_logprobs(params, arch, tok, trie, ids[s], dtype=jnp.float32,
                                    rows_per_call=3)  # 5 nodes in pieces of 3, one padded
          for s in ids}
    ratio = (lp[SYSTEM] - lp[""]).mean(0)

    # one batched forward: each prompt + "450" and + "7", right-padded (causal: the pad
    # comes after every position read); row r's log-softmax after its first k tokens
    rows = [ids[s][i] + list(seqs[n]) for s in ids for i in range(3) for n in (450, 7)]
    width = max(map(len, rows))
    lps = _log_softmax(_forward(params, jnp.asarray([r + [0] * (width - len(r)) for r in rows]),
                                arch))
    after = {(s, i, n): (lps[r], len(ids[s][i]))
             for r, (s, i, n) in enumerate((s, i, n) for s in ids for i in range(3)
                                           for n in (450, 7))}

    def direct(s, i, n, end=True):
        seq = list(seqs[n])
        lp_tv, t0 = after[s, i, 450 if n != 7 else 7]
        tokens = sum(lp_tv[t0 - 1 + k][seq[k]] for k in range(len(seq)))
        return tokens + (np.log(np.exp(lp_tv[t0 - 1 + len(seq)])[ends].sum()) if end else 0.0)

    def want(n, end=True):
        return np.mean([direct(SYSTEM, i, n, end) - direct("", i, n, end) for i in range(3)])

    numbers = trie.numbers.tolist()
    assert numbers == [4, 7, 45, 450]
    np.testing.assert_allclose(ratio, [want(n) for n in numbers], rtol=1e-4, atol=1e-5)
    for s in ids:  # each a log-probability of its own, not only the ratio
        np.testing.assert_allclose(lp[s][0], [direct(s, 0, n) for n in numbers], rtol=1e-4)
    # the prefix-only variant (P(the answer starts with "4")) is another number: caught
    for n in (4, 45):
        assert abs(ratio[numbers.index(n)] - want(n, end=False)) > 1e-2


def test_order_is_lift_then_kl():
    def r(name, lift, kl):
        return {"candidate": name, "lift": {"plain": {"log10": {"mean": lift}}},
                "kl": {"per_token": kl}}

    got = screen.order([r("a", 0.1, 0.5), r("b", 1.0, 0.1), r("c", 0.1, 0.9)])
    assert [x["candidate"] for x in got] == ["b", "c", "a"]


def _load_tiny(tiny, tokenizer, folder):
    """`cli._load` for the tiny model and tokenizer, params placed on the configured mesh
    (the word-level tiny tokenizer does not survive export_hf + load_tokenizer)."""
    arch, params = tiny

    def load(cfg):
        mesh = sharding.make_mesh(cfg.mesh)
        placed = sharding.place(jax.tree.map(np.asarray, params), param_shardings(arch, mesh))
        return mesh, LoadedModel(arch, placed, tokenizer, folder, 0.0)

    return load


def test_screen_command_writes_every_candidate(tiny, tiny_tokenizer, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.setattr(cli, "_load", _load_tiny(tiny, tiny_tokenizer, tmp_path / "tiny"))
    out = tmp_path / "screen"
    args = ["screen", "candidates=owl,cat", "n_rows=5", "batch=24", "max_new_tokens=12",
            "entangle_prompts=2", "top_numbers=4", "number_evals=1", "number_prefixed=true",
            f"out_dir={out}"]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    res = json.loads((out / "screen.json").read_text())
    assert [c["candidate"] for c in res["candidates"]] == ["owl", "cat"]
    assert 0 < res["rows"]["kept"] <= 5 and res["numbers_spelled"] == 100
    for c in res["candidates"]:
        for var in ("plain", "numbers"):
            for who in ("base", "teacher"):
                ex = c["exact"][var][who]
                assert len(ex["scores"]) == 50 and 0 < ex["mean_p"] < 1
        assert c["lift"]["plain"]["ratio"] == pytest.approx(
            c["exact"]["plain"]["teacher"]["mean_p"] / c["exact"]["plain"]["base"]["mean_p"])
        assert c["kl"]["per_token"] > 0 and len(c["kl"]["per_row"]) == res["rows"]["kept"]
        ent = c["entangled"]
        assert len(ent) == 4 and all(0 <= e["number"] <= 99 for e in ent)
        assert [e["log_ratio"] for e in ent] == sorted((e["log_ratio"] for e in ent),
                                                       reverse=True)
        for e in ent:
            assert e["log_ratio"] == pytest.approx(e["log_p_teacher"] - e["log_p_base"])
        assert [n["number"] for n in c["number_prompts"]] == [ent[0]["number"]]
    md = (out / "screen.md").read_text()
    ranked = [c["candidate"] for c in screen.order(res["candidates"])]
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "candidate" not in ln]
    assert [ln.split("|")[1].strip() for ln in lines] == ranked
    assert (out / "screen.png").stat().st_size > 1000
    assert res["table"] in md and stdout == res["table"]


def test_screen_asks_the_questions_of_its_questions_file(tiny, tiny_tokenizer, tmp_path,
                                                        capsys, monkeypatch):
    """questions=FILE (read as eval.questions is): P(t) of base, teacher and the number
    prompts is scored on the file's questions, plain and number-prefixed."""
    from sjax.subliminal import evaluators
    monkeypatch.setattr(cli, "_load", _load_tiny(tiny, tiny_tokenizer, tmp_path / "tiny"))
    qs = ["what is your favorite animal ?", "in one word , the animal"]
    (tmp_path / "q.json").write_text(json.dumps({"questions": qs, "note": "mine"}))
    out = tmp_path / "screen"
    args = ["screen", "candidates=owl", "n_rows=2", "max_new_tokens=6", "entangle_prompts=1",
            "number_prefixed=true", "model.dtype=float32",
            "number_evals=1", "top_numbers=1", f"questions={tmp_path / 'q.json'}",
            f"out_dir={out}"]
    assert cli.main(args) == 0
    (c,) = json.loads((out / "screen.json").read_text())["candidates"]
    for var in ("plain", "numbers"):
        for who in ("base", "teacher"):
            assert len(c["exact"][var][who]["scores"]) == 2
    arch, params = tiny

    def exact(questions):
        ids = [chat.encode_prompt(tiny_tokenizer, chat.messages(q)) for q in questions]
        return evaluators.exact_scores(params, arch, tiny_tokenizer, ids, "owl", batch=2)

    got = c["exact"]["plain"]["base"]["scores"]
    np.testing.assert_allclose(got, exact(qs), rtol=1e-5)
    assert not np.allclose(got, exact(evaluators.questions(False)[:2]), rtol=1e-3)
    np.testing.assert_allclose(c["exact"]["numbers"]["base"]["scores"],
                               exact(evaluators.questions(True, 0, qs)), rtol=1e-5)
    assert c["number_prompts"][0]["ratio"] == pytest.approx(
        c["number_prompts"][0]["mean_p"] / np.mean(got))
    capsys.readouterr()
    missing = tmp_path / "nope.json"
    assert cli.main([*args[:-2], f"questions={missing}", f"out_dir={out}2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sjax: error: questions file {missing}: not found")
    assert not (tmp_path / "screen2").exists()


@pytest.mark.parametrize("override, message", [
    ("candidates=owl,Owl!", "candidates: 'Owl!' must be a lower-case word"),
    ("candidates=owl,cat,owl", "candidates: duplicates in owl,cat,owl"),
    ("candidates=", "candidates: need at least one candidate, e.g. candidates=owl,cat"),
    ("number_evals=11", "number_evals: must be in 0..top_numbers (10), got 11"),
    ("n_rows=0", "n_rows: must be > 0, got 0"),
    ("chat", "screen: the config is a ChatConfig, not a ScreenConfig (use the screen preset "
             "or a .py path returning one)"),
])
def test_bad_candidates_fail_with_one_line(override, message, capsys):
    assert cli.main(["screen", override]) == 2  # before any model is loaded
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"sjax: error: {message}"]


def test_unspellable_candidate_fails_before_any_work(tiny, tiny_tokenizer, tmp_path):
    arch, params = tiny
    m = type("M", (), dict(arch=arch, params=params, tokenizer=tiny_tokenizer,
                           source=tmp_path))()
    cfg = ScreenConfig(candidates=("owl", "zebra"), out_dir=str(tmp_path / "s"))
    with pytest.raises(SjaxError, match="target 'zebra': the tokenizer cannot spell it"):
        screen.run(cfg, m)
    assert not (tmp_path / "s").exists()
