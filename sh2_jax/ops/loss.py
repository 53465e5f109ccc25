"""Per-token log-likelihoods from logits: the one definition scoring and training share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_loglik(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``log softmax(logits)[..., targets]``: logits [B, L, V], targets [B, L] int -> [B, L]
  float32 (natural log)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
