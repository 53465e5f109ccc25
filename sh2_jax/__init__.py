"""sh2-jax: StripedHyena 2 convolutional multi-hybrid language models in JAX/Flax."""

from sh2_jax.config import ModelConfig, resolve_layout
from sh2_jax.model import StripedHyena

__all__ = ["ModelConfig", "StripedHyena", "resolve_layout"]
