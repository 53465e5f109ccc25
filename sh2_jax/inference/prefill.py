"""Prefill: the parallel forward over right-padded prompts, filling the decoding cache.

tokens [B, L] (row b's prompt is ``tokens[b, :lengths[b]]``, anything after it is padding) ->
logits at each row's last prompt token [B, V] float32 and a ``Cache``. The forward is causal, so
padding after a prompt never reaches that prompt's outputs; each mixer reads its cache at the
row's own length, so every row equals that row run alone. A driver of the one forward: the
``Prefill`` mode and an empty cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax.modes import Prefill


def prefill(model, tokens: jax.Array, lengths: jax.Array, max_len: int):
  """Run the prompts; returns (logits [B, V] at position lengths-1, Cache).

  tokens: [B, L] int32, right-padded; lengths: [B] int32 in 1..L; max_len >= L is the KV
  cache size (the most positions any row may reach).
  """
  model.check_tokens(tokens)
  if max_len < tokens.shape[1]:
    raise ValueError(f"max_len {max_len} is shorter than the prompt batch length "
                     f"{tokens.shape[1]}")
  mode = Prefill(jnp.asarray(lengths, jnp.int32))
  logits, cache = model.forward(tokens, mode, model.init_cache(tokens.shape[0], max_len))
  return logits[:, 0], cache
