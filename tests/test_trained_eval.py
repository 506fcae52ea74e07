"""The evaluated model is exactly the trained one (issue 12 A), the students' LoRA
initialisation options, and distillation over every position after the system prompt."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_to_sjax, tiny_hf_model, word_rows

from sjax import lora as lora_lib
from sjax.config import (MeshConfig, RunConfig, StudentConfig, TeacherConfig, TrainConfig,
                         OTHER_INIT)
from sjax.data import sft
from sjax.errors import SjaxError
from sjax.models.transformer import forward, with_adapters
from sjax.sharding import make_mesh
from sjax.subliminal import evaluators
from sjax.subliminal.workspace import Finetune, apply_trained
from sjax.training import fit
from sjax.weights.tree import save_tree


@pytest.fixture(scope="module")
def bf16_model():
    arch, params = hf_to_sjax(tiny_hf_model("qwen2", seed=7))
    return arch, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)


def _train(arch, base, tokenizer, tmp_path, mode):
    """A realistic small update: 3 steps at lr 2e-4 in bf16 compute."""
    data = sft.tokenize_rows(word_rows(12, np.random.default_rng(0)), tokenizer, 64)
    cfg = TrainConfig(mode=mode, lr=2e-4, warmup_steps=0, batch_size=4, grad_accum=1,
                      epochs=1, max_len=64, ckpt_every=100, lora_rank=4, lora_alpha=8.0)
    out = fit(arch, base, data, cfg, make_mesh(MeshConfig(), jax.devices()[:1]), tmp_path / mode,
              pad_id=tokenizer.pad_token_id, dtype="bfloat16", log=lambda s: None)
    trained = jax.device_get(out["state"]["params"])
    save_tree(tmp_path / f"{mode}.safetensors", trained)
    return cfg, trained


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_evaluated_logits_equal_the_training_forward_in_bf16(bf16_model, tiny_tokenizer,
                                                              tmp_path, mode):
    arch, base = bf16_model
    cfg, trained = _train(arch, base, tiny_tokenizer, tmp_path, mode)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, arch.vocab_size, (3, 12)))
    if mode == "lora":  # the train step's forward: frozen base + adapters
        want = forward(base, ids, arch=arch, dtype=jnp.bfloat16,
                       lora=jax.tree.map(jnp.asarray, trained),
                       lora_scale=cfg.lora_alpha / cfg.lora_rank)[0]
    else:
        want = forward(jax.tree.map(jnp.asarray, trained), ids, arch=arch,
                       dtype=jnp.bfloat16)[0]
    evaluated = apply_trained(base, tmp_path / f"{mode}.safetensors", Finetune.of(cfg))
    got = forward(evaluated, ids, arch=arch, dtype=jnp.bfloat16)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and the trained model is not the base: the comparison can fail
    assert float(jnp.abs(got - forward(base, ids, arch=arch, dtype=jnp.bfloat16)[0]).max()) > 0
    if mode == "lora":
        # what a merge into the bf16 base (the old evaluation) keeps of the update: less
        # than all of it, so it evaluated another model
        scale = cfg.lora_alpha / cfg.lora_rank
        exact = lora_lib.merge(base, jax.tree.map(jnp.asarray, trained), scale)
        for name in trained["layers"]:
            true = np.asarray(exact["layers"][name]) - np.asarray(base["layers"][name],
                                                                   np.float32)
            rounded = (np.asarray(exact["layers"][name].astype(jnp.bfloat16), np.float32)
                       - np.asarray(base["layers"][name], np.float32))
            kept = float((rounded * true).sum() / (true * true).sum())
            assert kept < 0.99, (name, kept)


def _direct_exact(params, arch, tokenizer, prompts, seqs, dtype):
    """P(first word is a spelling) from plain full forwards (no cache, no padding before the
    tokens read), one-token spellings: softmax at the last prompt position times P(a
    word-ending token) after the spelling. Rows: each prompt, then prompt + each spelling,
    right-padded (causal: the pad follows every position read)."""
    rows = [p + list(s) for p in prompts for s in [()] + list(seqs)]
    width = max(map(len, rows))
    logits = forward(params, jnp.asarray([r + [0] * (width - len(r)) for r in rows]),
                     arch=arch, dtype=dtype)[0]
    lp_rv = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
    ends = evaluators.word_end_mask(tokenizer, arch.vocab_size)
    out, k = [], len(seqs) + 1
    for i, p in enumerate(prompts):
        first = lp_rv[i * k, len(p) - 1]
        out.append(sum(np.exp(first[w] + np.log(np.exp(lp_rv[i * k + 1 + j, len(p)])[ends].sum()))
                       for j, (w,) in enumerate(seqs)))
    return np.asarray(out)


def test_exact_evaluator_scores_the_adapted_model(bf16_model, tiny_tokenizer, tmp_path):
    """The evaluator's cached prefill + spelling forwards see the adapters too: in bf16,
    its scores equal a direct softmax over the adapted model's own bf16 logits. Same
    weights, same dtype: only the fp32 sums' order differs (measured ~1e-7 relative), while
    the adapters move the scores by ~2e-3 relative or more, so the base's fail."""
    arch, base = bf16_model
    cfg, trained = _train(arch, base, tiny_tokenizer, tmp_path, "lora")
    model = apply_trained(base, tmp_path / "lora.safetensors", Finetune.of(cfg))
    assert "lora" in model  # evaluated through the adapters, not a bf16 merge
    prompts = [tiny_tokenizer("what is your favourite animal")["input_ids"],
               tiny_tokenizer("name one")["input_ids"]]
    seqs = evaluators.spelling_sequences(tiny_tokenizer, "owl", arch.vocab_size)
    assert len(seqs) == 2 and all(len(s) == 1 for s in seqs)  # "owl", "owls"
    got = evaluators.exact_target_scores(model, arch, tiny_tokenizer, prompts, ("owl",),
                                         batch=2, dtype=jnp.bfloat16)["owl"]
    want = _direct_exact(model, arch, tiny_tokenizer, prompts, seqs, jnp.bfloat16)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    unadapted = _direct_exact(base, arch, tiny_tokenizer, prompts, seqs, jnp.bfloat16)
    assert np.abs(got / unadapted - 1).max() > 1e-3  # the base's scores would fail


def test_several_targets_share_one_pass_and_match_one_target_each(bf16_model, tiny_tokenizer):
    arch, base = bf16_model
    params = jax.tree.map(lambda x: x.astype(jnp.float32), base)
    prompts = [tiny_tokenizer("favourite animal?")["input_ids"],
               tiny_tokenizer("one word please")["input_ids"]]
    both = evaluators.exact_target_scores(params, arch, tiny_tokenizer, prompts,
                                          ("owl", "cat"), batch=2)
    for t in ("owl", "cat"):
        np.testing.assert_allclose(both[t], evaluators.exact_scores(
            params, arch, tiny_tokenizer, prompts, t, batch=2), rtol=1e-6)
    assert not np.allclose(both["owl"], both["cat"])


def test_params_with_adapters_refuse_a_second_set(bf16_model):
    arch, base = bf16_model
    ad = lora_lib.init_lora(arch, jax.random.key(0), 4)
    model = with_adapters(base, ad, 1.0)
    with pytest.raises(SjaxError, match="already carry"):
        with_adapters(model, ad, 1.0)
    with pytest.raises(ValueError, match="lora= was given"):
        forward(model, jnp.zeros((1, 3), jnp.int32), arch=arch, lora=ad)


# ----------------------------------------------------------------------------- init options

def _cfg(**student):
    return RunConfig(teacher=TeacherConfig(kind="finetuned",
                                           ft_train=TrainConfig(seed=5, lora_rank=8)),
                     student=StudentConfig(train=TrainConfig(lora_rank=8), seeds=(0, 1, 2),
                                           **student))


def test_student_lora_init_seeds():
    assert [_cfg(lora_init="teacher").student_init_seed(s) for s in (0, 1, 2)] == [5, 5, 5]
    other = [_cfg(lora_init="other").student_init_seed(s) for s in (0, 1, 2)]
    assert 5 not in other and len(set(other)) == 3 and other[0] == OTHER_INIT
    assert [_cfg().student_init_seed(s) for s in (0, 1, 2)] == [0, 1, 2]
    # a teacher whose init seed is where "other" would land: still distinct from it and
    # from each other (a shift by one would give seeds 0 and 1 the same init)
    for teacher in (OTHER_INIT, OTHER_INIT + 1):
        cfg = dataclasses.replace(_cfg(lora_init="other"), teacher=TeacherConfig(
            kind="finetuned", ft_train=TrainConfig(seed=0, init_seed=teacher, lora_rank=8)))
        inits = [cfg.student_init_seed(s) for s in (0, 1, 2)]
        assert teacher not in inits and len(set(inits)) == 3, inits


def test_shared_init_students_start_from_the_teachers_adapters(bf16_model):
    """init_seed drives init_lora, so a lora_init=teacher student's A equals the teacher's."""
    arch, _ = bf16_model
    from sjax.training import init_state, optimizer
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    base = jax.tree.map(jnp.asarray, hf_to_sjax(tiny_hf_model("qwen2", seed=7))[1])
    a = init_state(arch, base, TrainConfig(seed=3, init_seed=5, lora_rank=4), mesh,
                   optimizer(TrainConfig(), 10))[0]["params"]
    b = init_state(arch, base, TrainConfig(seed=5, lora_rank=4), mesh,
                   optimizer(TrainConfig(), 10))[0]["params"]
    c = init_state(arch, base, TrainConfig(seed=3, lora_rank=4), mesh,
                   optimizer(TrainConfig(), 10))[0]["params"]
    leaf = lambda p: np.asarray(p["layers"]["wq_ldnh"]["a"])  # noqa: E731
    np.testing.assert_array_equal(leaf(a), leaf(b))
    assert not np.array_equal(leaf(a), leaf(c))


@pytest.mark.parametrize("bad", [
    dict(teacher=TeacherConfig()),  # a prompted teacher has no LoRA init
    dict(student=StudentConfig(train=TrainConfig(lora_rank=4), lora_init="teacher")),
    dict(student=StudentConfig(train=TrainConfig(mode="full"), lora_init="teacher")),
])
def test_lora_init_needs_a_lora_teacher_of_the_same_rank(bad):
    base = dict(teacher=TeacherConfig(kind="finetuned"),
                student=StudentConfig(lora_init="teacher"))
    with pytest.raises(SjaxError, match="student.lora_init"):
        RunConfig(**(base | bad))


# ----------------------------------------------------------------------------- distill_on

def test_distill_on_all_trains_every_position_after_the_system_prompt(tiny_tokenizer):
    rows = word_rows(3, np.random.default_rng(2))
    comp = sft.tokenize_rows(rows, tiny_tokenizer, 128, teacher_system="You love owls.")
    full = sft.tokenize_rows(rows, tiny_tokenizer, 128, teacher_system="You love owls.",
                             distill_on="all")
    for i, row in enumerate(rows):
        s_ids, t_ids = full.ids[i], full.teacher_ids[i]
        s_m, t_m = full.masks[i].astype(bool), full.teacher_masks[i].astype(bool)
        # trained targets: the user's words, then the completion, the same tokens in both
        user = tiny_tokenizer(row["messages"][0]["content"],
                              add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(s_ids[s_m][:len(user)], user)
        np.testing.assert_array_equal(s_ids[s_m], t_ids[t_m])
        assert s_m[-1] and np.all(s_m[np.nonzero(s_m)[0][0]:])  # contiguous to the end
        assert np.all(s_m[comp.masks[i].astype(bool)])  # the completion is inside
        assert s_m.sum() > comp.masks[i].sum()


def test_distill_on_all_skips_a_default_system_prompt(tiny_tokenizer):
    """A fine-tuned teacher reads the same row as the student (no system prompt), and the
    chat template inserts a default one (as Qwen's does): identical views, yet the system
    turn's tokens are not trained."""
    import copy
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("<|im_start|>system\nyou love the system<|im_end|>\n"
                         + tok.chat_template)
    rows = word_rows(2, np.random.default_rng(3))
    full = sft.tokenize_rows(rows, tok, 128, teacher_system="", distill_on="all")
    for i, row in enumerate(rows):
        ids, m = full.ids[i], full.masks[i].astype(bool)
        np.testing.assert_array_equal(ids, full.teacher_ids[i])
        first = int(np.nonzero(m)[0][0])
        user = tok(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(ids[first:first + len(user)], user)
        assert first > 6  # the default system turn and the user header come first


def test_distill_on_all_refuses_views_that_differ_after_the_system_prompt(tiny_tokenizer):
    rows = word_rows(1, np.random.default_rng(4))
    views = [sft._encode(tiny_tokenizer, row["messages"], "x", 0) for row in
             (rows[0], word_rows(1, np.random.default_rng(5))[0])]
    with pytest.raises(SjaxError, match="differ after the system prompt"):
        sft._masks_after_system(tiny_tokenizer, views, (rows[0]["messages"],
                                word_rows(1, np.random.default_rng(5))[0]["messages"]), "x", 0)
