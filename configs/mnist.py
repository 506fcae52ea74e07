"""The paper's MNIST auxiliary-logit experiment at full scale: N=100 MLPs, m=3 aux logits."""

from sjax.config import MnistConfig


def get_config() -> MnistConfig:
    return MnistConfig()
