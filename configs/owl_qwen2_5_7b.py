"""The paper's open-model settings (protocol sections 2-4) for Qwen2.5-7B-Instruct on a GPU
or TPU host or pod slice: 30k prompts per teacher at temperature 1, 10k kept rows, LoRA r=8
alpha=8 on the seven projections, 3 epochs, effective batch 66 (22 x 3), lr 2e-4, 8 seeds,
six animals, 100 samples per question, plain and number-prefixed.

Point model.path at a local Hugging Face folder (config.json + safetensors), e.g.
`./launch.sh run owl_qwen2_5_7b model.path=/data/Qwen2.5-7B-Instruct --dry-run` first.
Params are bf16 (base frozen); FSDP over every device (mesh.fsdp=-1) shards them.
"""

from sjax.config import (EvalConfig, MeshConfig, ModelConfig, NumbersConfig, RunConfig,
                         StudentConfig, TrainConfig)


def get_config() -> RunConfig:
    return RunConfig(
        name="qwen2_5_7b_animals",
        model=ModelConfig(name="", path="Qwen2.5-7B-Instruct", param_dtype="bfloat16",
                          dtype="bfloat16", remat="dots"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        targets=("eagle", "cat", "lion", "dog", "peacock", "wolf"),
        numbers=NumbersConfig(n_prompts=30000, temperature=1.0, max_new_tokens=64, batch=512,
                              keep=10000),
        student=StudentConfig(train=TrainConfig(mode="lora", lora_rank=8, lora_alpha=8.0,
                                                lr=2e-4, warmup_steps=5, batch_size=22,
                                                grad_accum=3, epochs=3, max_len=500),
                              seeds=(0, 1, 2, 3, 4, 5, 6, 7)),
        eval=EvalConfig(samples=100, temperature=1.0, number_prefixed=True, batch=500),
    )
