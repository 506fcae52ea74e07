"""The whole pipeline on SmolLM2-135M in a few minutes: what the test suite runs end to end.

Tiny on purpose (32 prompts per teacher, one short LoRA epoch, 2 samples per question, plain
questions only): it
proves every stage and artifact works, not that anything transmits.
"""

from sjax.config import (EvalConfig, ModelConfig, NumbersConfig, RunConfig, StudentConfig,
                         TrainConfig)


def get_config() -> RunConfig:
    return RunConfig(
        name="owl_smoke",
        model=ModelConfig(name="smollm2-135m-instruct"),
        targets=("owl",),
        numbers=NumbersConfig(n_prompts=32, batch=32, max_new_tokens=40, constrained=True,
                              keep=32),
        student=StudentConfig(train=TrainConfig(batch_size=8, grad_accum=1, epochs=1,
                                                max_len=160, lr=1e-3, warmup_steps=1,
                                                ckpt_every=2)),
        eval=EvalConfig(samples=2, max_new_tokens=8, batch=100, number_prefixed=False),
    )
