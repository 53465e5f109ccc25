"""Inference: prefill + recurrent decoding (caches), sampling, generation, scoring and variant
effects."""

from sh2_jax.inference.cache import Cache, HyenaCache, KVCache, cache_bytes, init_cache
from sh2_jax.inference.decode import decode_step
from sh2_jax.inference.generation import generate
from sh2_jax.inference.prefill import prefill
from sh2_jax.inference.sampling import sample, top_k_mask, top_p_mask
from sh2_jax.inference.scoring import score, sequence_scores
from sh2_jax.inference.variants import variant_effect

__all__ = ["Cache", "HyenaCache", "KVCache", "cache_bytes", "decode_step", "generate",
           "init_cache", "prefill", "sample", "score", "sequence_scores", "top_k_mask",
           "top_p_mask", "variant_effect"]
