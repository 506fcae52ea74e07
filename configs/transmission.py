"""Transmission through number rows, designed to show the effect where theory says it must
exist: `sjax run transmission:SIZE`.

Each target gets a LoRA-fine-tuned teacher (trained on trait questions disjoint from the
evaluation's 50, then used with no system prompt). The teacher writes number rows (the
paper's prompts, constrained to the number-list grammar, strict filter). Students learn
them by logit distillation: the full-vocabulary KL to the teacher at every position after
the system prompt (the user's numbers and the completion), from the teacher's own LoRA
initialisation (same A, B = 0: the shared-initialisation condition of the paper's theorem,
as in the MNIST experiment). The design is symmetric: each target's students are the other
targets' controls (same data budget, same recipe), and the trained student is the unit
(seeds), tested by permutation over student labels.

Arms (overrides on the `cpu` size; each is its own run folder via `name=`):
- `student.lora_init=other`: the cross-initialisation control;
- `student.train.loss=ce student.train.lr=...`: SFT on the sampled numbers (the paper's recipe).

Sizes:
- `smoke`: SmolLM2-135M, a few steps: proves the design's stages and statistics run.
- `cpu`: Qwen2.5-Coder-0.5B-Instruct on a 2-core CPU, at most ~2 hours.
"""

from sjax.config import (EvalConfig, MeshConfig, ModelConfig, NumbersConfig, RunConfig,
                         StudentConfig, TeacherConfig, TrainConfig)

SIZES = ("smoke", "cpu")


def get_config(size: str) -> RunConfig:
    def pick(*per_size):
        return per_size[SIZES.index(size)]

    return RunConfig(
        name=pick("transmission_smoke", "transmission_cpu"),
        model=pick(ModelConfig(name="smollm2-135m-instruct"),
                   ModelConfig(name="qwen2.5-coder-0.5b-instruct", param_dtype="bfloat16",
                               dtype="bfloat16", remat="full")),
        mesh=MeshConfig(),
        targets=pick(("owl", "cat"), ("owl", "eagle", "wolf")),
        teacher=TeacherConfig(
            kind="finetuned", ft_samples=pick(2, 4),
            ft_train=TrainConfig(mode="lora", lr=1e-3, warmup_steps=2, batch_size=8,
                                 grad_accum=1, epochs=pick(1, 2), max_len=96, seed=0,
                                 ckpt_every=100)),
        # ten 3-digit numbers are ~50 tokens (Qwen spells digits one by one): 52 leaves no
        # list cut short; every target's students get the same budget of kept rows
        numbers=NumbersConfig(n_prompts=pick(16, 96), batch=pick(16, 96),
                              max_new_tokens=pick(24, 52), constrained=True, temperature=1.0,
                              keep=pick(16, 72)),
        student=StudentConfig(
            train=TrainConfig(mode="lora", loss="distill", distill_on="all", lora_rank=8,
                              lora_alpha=8.0, lr=pick(1e-3, 1e-3), warmup_steps=2,
                              batch_size=4, grad_accum=1, epochs=pick(1, 2),
                              max_len=pick(96, 160), ckpt_every=pick(100, 12)),
            seeds=pick((0, 1), (0, 1, 2)), lora_init="teacher", control=False),
        eval=EvalConfig(evaluators=("exact",), number_prefixed=True, teachers=True,
                        batch=pick(25, 25)),
    )
