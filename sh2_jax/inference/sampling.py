"""Choosing the next token from logits [B, V]: greedy, temperature, top-k, top-p.

Masks set excluded logits to -inf; ties at a threshold are kept. Randomness: one key per
step and row, ``fold_in(fold_in(key(seed), step), row)``, so a seed fixes the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_mask(logits: jax.Array, k) -> jax.Array:
  """Keep the k largest logits of each row (k: int or int array, 0 means off). [B, V]."""
  vocab = logits.shape[-1]
  k = jnp.asarray(k, jnp.int32)
  kth = jnp.sort(logits, axis=-1)[..., vocab - jnp.clip(k, 1, vocab)][..., None]
  return jnp.where((k <= 0) | (logits >= kth), logits, -jnp.inf)


def top_p_mask(logits: jax.Array, p) -> jax.Array:
  """Nucleus: keep the most likely tokens until their probability reaches p (the top token is
  always kept; p >= 1 keeps everything). [B, V]."""
  order = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(order, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = mass_before < p
  threshold = jnp.min(jnp.where(kept, order, jnp.inf), axis=-1, keepdims=True)
  return jnp.where((p >= 1.0) | (logits >= threshold), logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, step, temperature, top_k, top_p,
           greedy: bool) -> jax.Array:
  """logits [B, V] -> token ids [B] int32. ``greedy`` (static) takes the argmax; otherwise
  logits / temperature, then the top-k and top-p masks, then a categorical draw."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  logits = top_p_mask(top_k_mask(logits, top_k), top_p)
  step_key = jax.random.fold_in(key, step)
  keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(logits.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def check_sampling(temperature, top_k, top_p, vocab_size: int) -> None:
  """One clear error for a bad sampling setting."""
  if not temperature >= 0:
    raise ValueError(f"temperature {temperature!r} must be >= 0 (0 is greedy)")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k {top_k!r} must be None or an integer in 1..{vocab_size}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p {top_p!r} must be None or in (0, 1]")
