"""The subliminal-learning experiment at three sizes: `sjax run owl:SIZE`.

- `smoke`: the whole pipeline on SmolLM2-135M in a few minutes, what the test suite runs end
  to end. Tiny on purpose (32 prompts per teacher, one short LoRA epoch, 2 samples per
  question, plain questions only): it proves every stage and artifact works, not that
  anything transmits.
- `quickstart` (`./launch.sh`): the owl experiment on Qwen2.5-Coder-0.5B-Instruct, sized for
  about half an hour on a 2-core CPU. For the clearest signal at that budget: numbers are
  sampled under the number-list constraint (every completion passes the filter, nothing is
  wasted); students learn by logit distillation from their teacher (the whole next-token
  distribution, not one sampled token, carries the teacher's hidden signal); the exact
  evaluator measures P(first word is "owl") without sampling noise, paired over the 50
  questions; 4 sampled answers per question (the paper uses 100). bf16 base and compute (fp32
  accumulation), as the protocol's LoRA students; remat=full is also the fastest LoRA step on
  CPU (see the training benchmark).
- `paper`: the paper's open-model settings (protocol sections 2-4) for Qwen2.5-7B-Instruct on
  a GPU or TPU host or pod slice, with the paper's six animals (not owl): 30k prompts per
  teacher, 10k kept rows, LoRA r=8 alpha=8, 3 epochs, effective batch 66 (22 x 3), lr 2e-4,
  8 seeds, 100 samples per question. Point model.path at a local Hugging Face folder, e.g.
  `./launch.sh run owl:paper model.path=/data/Qwen2.5-7B-Instruct --dry-run` first; bf16
  params (base frozen), FSDP over every device.
- `paper14b`: the positive control at paper scale, Qwen2.5-14B-Instruct with the public
  Qwen scaling sweeps' settings (rain-1/subliminal-learning-scaling-law: 10k kept rows, 10
  epochs, lr 2e-4, LoRA r=8 alpha=8, effective batch 60), where the sweep measured a
  trait-specific lift of +13 to +40 points (eagle ~99%, lion ~95%); their animals. About
  45 minutes of one H200 per student. `--dry-run` with `model.path=` a folder holding the
  model's config.json (e.g. sjax/weights/archs/qwen2.5-14b) plans it without weights.

Each knob below lists its value per size, in the order of SIZES. The run names predate the
sizes and name the run folders, so they stay.
"""

from sjax.config import (EvalConfig, MeshConfig, ModelConfig, NumbersConfig, RunConfig,
                         StudentConfig, TrainConfig)

SIZES = ("smoke", "quickstart", "paper", "paper14b")


def get_config(size: str) -> RunConfig:
    def pick(*per_size):
        return per_size[SIZES.index(size)]

    return RunConfig(
        name=pick("owl_smoke", "owl_quickstart", "qwen2_5_7b_animals", "qwen2_5_14b_animals"),
        model=pick(ModelConfig(name="smollm2-135m-instruct"),
                   ModelConfig(name="qwen2.5-coder-0.5b-instruct", param_dtype="bfloat16",
                               dtype="bfloat16", remat="full"),
                   ModelConfig(name="", path="Qwen2.5-7B-Instruct", param_dtype="bfloat16",
                               dtype="bfloat16", remat="dots"),
                   ModelConfig(name="", path="Qwen2.5-14B-Instruct", param_dtype="bfloat16",
                               dtype="bfloat16", remat="dots")),
        mesh=pick(MeshConfig(), MeshConfig(), MeshConfig(data=1, fsdp=-1, tensor=1),
                  MeshConfig(data=1, fsdp=-1, tensor=1)),
        targets=pick(("owl",), ("owl",), ("eagle", "cat", "lion", "dog", "peacock", "wolf"),
                     ("eagle", "lion", "phoenix", "dragon", "wolf", "owl")),
        numbers=NumbersConfig(n_prompts=pick(32, 128, 30000, 30000),
                              batch=pick(32, 128, 512, 512),
                              max_new_tokens=pick(40, 49, 64, 64),
                              constrained=pick(True, True, False, False), temperature=1.0,
                              keep=pick(32, 128, 10000, 10000)),
        student=StudentConfig(
            train=TrainConfig(mode="lora", loss=pick("ce", "distill", "ce", "ce"), lora_rank=8,
                              lora_alpha=8.0, lr=pick(1e-3, 1e-3, 2e-4, 2e-4),
                              warmup_steps=pick(1, 2, 5, 5), batch_size=pick(8, 16, 22, 20),
                              grad_accum=pick(1, 1, 3, 3), epochs=pick(1, 1, 3, 10),
                              max_len=pick(160, 192, 500, 500),
                              ckpt_every=pick(2, 5, 50, 200)),
            seeds=pick((0,), (0,), tuple(range(8)), (0, 1, 2))),
        eval=EvalConfig(samples=pick(2, 4, 100, 100), max_new_tokens=pick(8, 8, 16, 16),
                        batch=pick(100, 200, 500, 500),
                        number_prefixed=pick(False, True, True, True), temperature=1.0),
    )
