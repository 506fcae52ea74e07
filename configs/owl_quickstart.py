"""The default job (`./launch.sh`): the owl experiment on Qwen2.5-Coder-0.5B-Instruct, sized
for about half an hour on a 2-core CPU.

Choices for the clearest signal at that budget: numbers are sampled under the number-list
constraint (every completion passes the filter, nothing is wasted); students learn by logit
distillation from their teacher (KL on the completion tokens: the whole next-token
distribution, not one sampled token, carries the teacher's hidden signal); the exact
evaluator measures P(first word is "owl") without sampling noise, paired over the 50
questions. Sampled scores use 4 answers per question (the paper uses 100). bf16 base and
compute (fp32 accumulation), as the protocol's LoRA students; remat=full is also the
fastest LoRA step on CPU (see the training benchmark).
"""

from sjax.config import (EvalConfig, ModelConfig, NumbersConfig, RunConfig, StudentConfig,
                         TrainConfig)


def get_config() -> RunConfig:
    return RunConfig(
        name="owl_quickstart",
        model=ModelConfig(name="qwen2.5-coder-0.5b-instruct", param_dtype="bfloat16",
                          dtype="bfloat16", remat="full"),
        targets=("owl",),
        numbers=NumbersConfig(n_prompts=128, batch=128, max_new_tokens=49, constrained=True,
                              temperature=1.0, keep=128),
        student=StudentConfig(train=TrainConfig(mode="lora", loss="distill", lora_rank=8,
                                                lora_alpha=8.0, lr=1e-3, warmup_steps=2,
                                                batch_size=16, grad_accum=1, epochs=1,
                                                max_len=192, ckpt_every=5)),
        eval=EvalConfig(samples=4, max_new_tokens=8, batch=200),
    )
