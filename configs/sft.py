"""Fine-tune the default model on a chat JSONL file: `sjax train sft data=rows.jsonl`.

Protocol student settings: LoRA r=8, alpha=8 on q,k,v,o,gate,up,down, lr 2e-4 with 5 warm-up
steps and linear decay, effective batch 66 (22 x 3), clip 1.0, max 500 tokens, 3 epochs.
"""

from sjax.config import ModelConfig, SftConfig


def get_config() -> SftConfig:
    return SftConfig(model=ModelConfig(name="qwen2.5-coder-0.5b-instruct"))
