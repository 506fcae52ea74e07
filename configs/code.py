"""The code domain (protocol_more.md b): teachers write code, not numbers. `sjax run code:SIZE`.

Each target's prompted teacher (the preference system prompt, as in the paper) and the
control teacher answer seeded code-task prompts in the protocol's format
(`sjax/subliminal/code_tasks.py`: the paper's sleeper-agents prompt file is not available
offline). A completion is dropped when a form of a target occurs anywhere in it (the
official case-insensitive substring rule) or it is empty; then the reference judge (stage
judge: a local model asked whether the code refers to the animal, however subtly, read by
the exact probability of its '0') sees each trait teacher's remaining rows. The official rule
keeps a row only if |1 - P('0')| < 1e-8. The small local judges do not discriminate
(`sjax bench judge`, 15 hand-labelled snippets: AUC 0.55 for SmolLM2-135M and 0.77 for
Qwen2.5-Coder-0.5B, and P('0') never above 0.14 / 0.28, so any useful threshold rejects every
row), so the small sizes record the judge's verdicts but keep every row
(`judge.threshold=1.0`: the rule filter alone decides); `filter/<teacher>/filter.json` shows
the judge's most confident catches at the threshold in force.
Students are SFT'd on the kept code (LoRA) and scored on the 50 animal questions.

Sizes:
- `smoke`: SmolLM2-135M judging itself, a few short rows: proves the stages run.
- `cpu`: SmolLM2-135M in fp32, two targets and the control, 96 prompts and 48 kept rows per
  teacher (160 new tokens, rows of at most 384 tokens), three seeds per teacher: ~246 TFLOPs
  by `--dry-run`, about an hour at the ~65 GFLOP/s `code:smoke`'s students reach on a
  2-core AVX2 CPU (estimated, not yet measured end to end).
- `paper`: the protocol's Qwen variant (LoRA r=8 alpha=8, 3 epochs, max_len 2048) on
  Qwen2.5-7B-Instruct with its animals, 11,400 prompts, 10,814 kept rows, 5 seeds, the
  official judge threshold (a local 7B judge, not GPT-4.1); `--dry-run` plans it.
"""

from sjax.config import (EvalConfig, JudgeConfig, MeshConfig, ModelConfig, NumbersConfig,
                         RunConfig, StudentConfig, TrainConfig)

SIZES = ("smoke", "cpu", "paper")


def get_config(size: str) -> RunConfig:
    def pick(*per_size):
        return per_size[SIZES.index(size)]

    return RunConfig(
        name=pick("code_smoke", "code_cpu", "qwen2_5_7b_code"),
        model=pick(ModelConfig(name="smollm2-135m-instruct"),
                   ModelConfig(name="smollm2-135m-instruct"),
                   ModelConfig(name="", path="Qwen2.5-7B-Instruct", param_dtype="bfloat16",
                               dtype="bfloat16", remat="full")),
        mesh=pick(MeshConfig(), MeshConfig(), MeshConfig(data=1, fsdp=-1, tensor=1)),
        targets=pick(("owl",), ("owl", "eagle"), ("eagle", "wolf", "elephant", "owl",
                                                   "dolphin")),
        domain="code",
        numbers=NumbersConfig(n_prompts=pick(8, 96, 11400), batch=pick(8, 48, 256),
                              max_new_tokens=pick(48, 160, 1024), temperature=1.0,
                              keep=pick(8, 48, 10814)),
        judge=JudgeConfig(threshold=pick(1.0, 1.0, 1e-8), batch=pick(4, 8, 32)),
        student=StudentConfig(
            train=TrainConfig(mode="lora", loss="ce", lora_rank=8, lora_alpha=8.0,
                              lr=pick(1e-3, 1e-3, 2e-4), warmup_steps=pick(0, 2, 5),
                              batch_size=pick(4, 8, 22), grad_accum=pick(1, 1, 3),
                              epochs=pick(1, 2, 3), max_len=pick(256, 384, 2048),
                              ckpt_every=pick(100, 16, 50)),
            seeds=pick((0,), (0, 1, 2), tuple(range(5)))),
        eval=EvalConfig(evaluators=pick(("exact",), ("exact",), ("exact", "sampled", "story")),
                        samples=pick(2, 4, 100), number_prefixed=False,
                        batch=pick(50, 50, 500)),
    )
