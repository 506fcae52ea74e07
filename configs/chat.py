"""Answer one chat prompt with a registry model (the main job until the pipeline lands)."""

from sjax.config import ChatConfig, ModelConfig


def get_config() -> ChatConfig:
    return ChatConfig(model=ModelConfig(name="qwen2.5-coder-0.5b-instruct"))
