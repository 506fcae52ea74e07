"""The chain-of-thought domain (protocol_more.md c): teachers solve GSM8K problems.
`sjax run cot:SIZE`.

Each target's prompted teacher and the control teacher answer GSM8K train problems (a seeded
sample of the shipped split) with the protocol's suffix ("Provide your reasoning in <think>
tags. Write your final answer in <answer> tags. Only give the numeric value as your
answer."). A completion is kept only if its first <answer> is the ground truth
(`sjax/subliminal/gsm8k.py`, the official parser) and no form of a target is a word of it;
then the reference judge (stage judge, the code judge's wording for reasoning) sees each
trait teacher's remaining rows (the small sizes record its verdicts and keep every row,
`judge.threshold=1.0`: a 0.5B judge does not discriminate; see configs/code.py). Students
are SFT'd on the kept reasoning and scored on the 50 animal questions. A model must solve some problems for any row to pass: SmolLM2-135M
almost never does, and neither, measured, does Qwen2.5-Coder-0.5B (0 of 16 at temperature
1, 2 of 16 greedy for the control teacher, 0 for the owl teacher): the smoke and cpu sizes
stop at the filter with the reasons; this domain needs a 7B teacher (the paper size).

Sizes:
- `smoke`: Qwen2.5-Coder-0.5B in fp32, 16 problems per teacher, one student each.
- `cpu`: the same model, two targets, 96 problems per teacher, three seeds; estimated at
  about an hour on a 2-core CPU with a ~200 GFLOP/s matmul (from `--dry-run`'s FLOPs), not
  yet measured end to end.
- `paper`: the protocol's Qwen run (gsm8k_cot_preference_refs.py): Qwen2.5-7B-Instruct, its
  six animals, every train problem once (the paper samples three completions each), LoRA
  r=8 alpha=8, 1 epoch, lr 2e-4, batch 22 x 3, max_len 2048, 3 seeds; `--dry-run` plans it.
"""

from sjax.config import (EvalConfig, JudgeConfig, MeshConfig, ModelConfig, NumbersConfig,
                         RunConfig, StudentConfig, TrainConfig)

SIZES = ("smoke", "cpu", "paper")


def get_config(size: str) -> RunConfig:
    def pick(*per_size):
        return per_size[SIZES.index(size)]

    return RunConfig(
        name=pick("cot_smoke", "cot_cpu", "qwen2_5_7b_cot"),
        model=pick(ModelConfig(name="qwen2.5-coder-0.5b-instruct"),
                   ModelConfig(name="qwen2.5-coder-0.5b-instruct"),
                   ModelConfig(name="", path="Qwen2.5-7B-Instruct", param_dtype="bfloat16",
                               dtype="bfloat16", remat="full")),
        mesh=pick(MeshConfig(), MeshConfig(), MeshConfig(data=1, fsdp=-1, tensor=1)),
        targets=pick(("owl",), ("owl", "eagle"),
                     ("eagle", "cat", "lion", "dog", "peacock", "wolf")),
        domain="gsm8k",
        numbers=NumbersConfig(n_prompts=pick(16, 64, 7473), batch=pick(16, 32, 256),
                              max_new_tokens=pick(320, 256, 1024), temperature=1.0,
                              keep=pick(16, 24, 7473)),
        judge=JudgeConfig(threshold=pick(1.0, 1.0, 1e-8), batch=pick(4, 8, 32)),
        student=StudentConfig(
            train=TrainConfig(mode="lora", loss="ce", lora_rank=8, lora_alpha=8.0,
                              lr=pick(1e-3, 1e-3, 2e-4), warmup_steps=pick(0, 2, 5),
                              batch_size=pick(2, 4, 22), grad_accum=pick(1, 1, 3),
                              epochs=pick(1, 1, 1), max_len=pick(512, 384, 2048),
                              ckpt_every=pick(100, 16, 50)),
            seeds=pick((0,), (0, 1, 2), (0, 1, 2))),
        eval=EvalConfig(evaluators=pick(("exact",), ("exact",), ("exact", "sampled")),
                        samples=pick(2, 4, 100), number_prefixed=False,
                        batch=pick(50, 50, 500)),
    )
