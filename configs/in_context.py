"""The in-context control (the paper's section on in-context learning,
icl_protocol.json): `sjax run in_context:SIZE`.

No student is trained (`train_students=false`: the run is teachers -> numbers -> filter ->
in_context). Each target's prompted teacher and the control teacher (the base, no system
prompt) write number rows (constrained to the number-list grammar, strict filter); then the
base model reads k of a teacher's kept rows as its system prompt, drawn with replacement
per seed in the protocol's template, and the exact evaluator scores P(first word names the
target) on the evaluation questions. The lift per target and k is the trait teacher's
contexts minus the control's, in mean log P, with the seeds (context draws) as units:
`RUN/in_context/summary.md` and `summary.png` (lift against k).

The context is every prompt's common prefix: it is prefilled once per unit and each
question reads it from the cache, so a unit costs about k x ~115 tokens (a numbers row in
Qwen's tokenizer) plus the questions' own few; the CPU size stops at k = 30 (~3.5k tokens);
the paper's k reach 10,000 rows on an API model.

Sizes:
- `smoke`: SmolLM2-135M, a few rows and two small k: proves the stage and its summary run.
- `cpu`: Qwen2.5-Coder-0.5B-Instruct in bf16, three targets, k = 3 and 30, six seeds (six
  draws per arm: the permutation test's floor is 1/924, low enough to survive Holm over
  the six (target, k) rows at 0.01), the first 20 of the 50 questions. Sized by
  measurement: a unit (one context, 50 questions, three targets) took ~80 s at k = 3 here,
  so 3 k x 50 questions x 72 units would take ~2.5 h; this size is ~45 min.
"""

from sjax.config import (EvalConfig, InContextConfig, MeshConfig, ModelConfig, NumbersConfig,
                         RunConfig, TeacherConfig)

SIZES = ("smoke", "cpu")


def get_config(size: str) -> RunConfig:
    def pick(*per_size):
        return per_size[SIZES.index(size)]

    return RunConfig(
        name=pick("in_context_smoke", "in_context_cpu"),
        model=pick(ModelConfig(name="smollm2-135m-instruct"),
                   ModelConfig(name="qwen2.5-coder-0.5b-instruct", param_dtype="bfloat16",
                               dtype="bfloat16")),
        mesh=MeshConfig(),
        targets=pick(("owl", "cat"), ("owl", "eagle", "wolf")),
        teacher=TeacherConfig(kind="prompted"),
        # ten 3-digit numbers are ~50 tokens in Qwen's tokenizer: 52 cuts no list short
        numbers=NumbersConfig(n_prompts=pick(16, 64), batch=pick(16, 64),
                              max_new_tokens=pick(40, 52), constrained=True, temperature=1.0,
                              keep=pick(16, 64)),
        eval=EvalConfig(evaluators=("exact",), number_prefixed=False),  # train_students=true
        in_context=InContextConfig(ks=pick((2, 8), (3, 30)),
                                   seeds=pick((0, 1), (0, 1, 2, 3, 4, 5)),
                                   max_tokens=pick(2048, 6144), n_questions=pick(5, 20),
                                   batch=pick(5, 10)),
        train_students=False,
    )
