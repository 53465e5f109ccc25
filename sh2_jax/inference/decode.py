"""One decoding step: the one forward in ``Decode`` mode (every layer's recurrent form).

tokens [B] (each row's next token, at position ``cache.lengths[b]``) + Cache -> logits [B, V]
float32 + the advanced Cache. Hyena layers step their featurizer and SE/MR filters as one
``ops.fir.fir_step`` over the cached window and LI as ``ops.modal.modal_step``; attention writes
its K/V at each row's own position and attends to the keys before it.
"""

from __future__ import annotations

import jax

from sh2_jax.modes import Cache, Decode


def decode_step(model, cache: Cache, tokens: jax.Array):
  """tokens [B] int32 -> (logits [B, V] float32, Cache advanced by one position).

  Every row must stay below the KV cache's max_len (``generate`` sizes it so): JAX drops a
  scatter past the end, so such a step would silently lose its key and value.
  """
  logits, cache = model.forward(tokens[:, None], Decode(cache.lengths), cache)
  return logits[:, 0], cache
