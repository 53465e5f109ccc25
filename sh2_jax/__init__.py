"""sh2-jax: StripedHyena 2 convolutional multi-hybrid language models in JAX/Flax."""

from sh2_jax.config import ModelConfig, resolve_layout
from sh2_jax.embed import embed, mean_pool
from sh2_jax.inference import generate, score
from sh2_jax.inference.segmented import segmented_logits, segmented_score
from sh2_jax.model import StripedHyena
from sh2_jax.zoo import load

__all__ = ["ModelConfig", "StripedHyena", "embed", "generate", "load", "mean_pool",
           "resolve_layout", "score", "segmented_logits", "segmented_score"]
