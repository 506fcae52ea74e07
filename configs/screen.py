"""`sjax screen`: rank candidate targets on Qwen2.5-Coder-0.5B-Instruct before any training.

Sized for about 10-15 minutes on this 2-core CPU, estimated, not run: SmolLM2-135M took
~50 s per candidate with these settings (measured at twice this load on a busy machine: ~100
s), and the 0.5B model does ~3.7x the FLOPs per token, so ~2 minutes per candidate and 5
candidates plus loading and sampling the rows ~12 minutes. Per candidate: 4 exact evaluations
of the 50 questions (base, teacher, and the top 2 numbers' system prompts; plain questions
only: number_prefixed=true adds 2 more), the KL over the 32 number rows (sampled once by the
base under the number-list grammar) and the number trie over 4 number prompts. Every figure
is a forward pass: `candidates=...` widens the screen at a proportional cost.
"""

from sjax.config import ModelConfig, ScreenConfig


def get_config() -> ScreenConfig:
    return ScreenConfig(
        model=ModelConfig(name="qwen2.5-coder-0.5b-instruct", param_dtype="bfloat16",
                          dtype="bfloat16"),
        candidates=("owl", "eagle", "cat", "wolf", "dolphin"),
        n_rows=32, max_new_tokens=49, temperature=1.0, constrained=True, number_prefixed=False,
        entangle_prompts=4, top_numbers=10, number_evals=2, batch=32, seed=0,
        out_dir="runs/screen")
