"""sjax: subliminal learning in JAX, from a laptop CPU to TPU pods and GPUs."""

__version__ = "0.1.0"
