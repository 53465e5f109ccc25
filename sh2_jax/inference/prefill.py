"""Prefill: the parallel forward over right-padded prompts, filling the decoding cache.

tokens [B, L] (row b's prompt is ``tokens[b, :lengths[b]]``, anything after it is padding) ->
logits at each row's last prompt token [B, V] float32 and a ``Cache``. The forward is causal, so
padding after a prompt never reaches that prompt's outputs; the cache is read at each row's own
length, so every row equals that row run alone. The blocks run through their own modules
(``model.residual_block`` with mixers that also return the cache, built from ``projections``,
``filter``, ``out_filter_dense``, ``inner_mha_cls.qkv`` / ``attend``): the forward's own pieces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax import conv
from sh2_jax.hyena import featurize
from sh2_jax.inference.cache import Cache, HyenaCache, KVCache, last_steps, right_align
from sh2_jax.model import residual_block


def _hyena_prefill(block, h, lengths):
  """h = pre_norm(x) [B, L, D] -> (mixer output [B, L, D], HyenaCache)."""
  filt = block.filter
  z = block.projections(h)                             # [B, L, 3D]
  x2, x1, v = featurize(z, filt.featurizer_taps())
  out = block.out_filter_dense(filt(x1, v, x2))        # the parallel inner filter
  u = x1 * v                                           # the u that the gated conv filters
  z_hist = last_steps(z, lengths, block.filter.cfg.featurizer_len - 1)
  if filt.op == "LI":
    state = conv.modal_state(right_align(u, lengths), filt.log_poles())
  else:
    state = last_steps(u, lengths, filt.fir_taps().shape[1] - 1)
  return out, HyenaCache(z_hist, state)


def _attention_prefill(block, h, max_len):
  """h [B, L, D] -> (mixer output, KVCache of max_len positions; 0..L-1 written)."""
  attn = block.inner_mha_cls
  b, length, _ = h.shape
  q, k, v = attn.qkv(h, jnp.arange(length))
  out = attn.attend(q, k, v)
  pad = ((0, 0), (0, max_len - length), (0, 0), (0, 0))
  return out, KVCache(jnp.pad(k, pad), jnp.pad(v, pad))


def prefill(model, tokens: jax.Array, lengths: jax.Array, max_len: int):
  """Run the prompts; returns (logits [B, V] at position lengths-1, Cache).

  tokens: [B, L] int32, right-padded; lengths: [B] int32 in 1..L; max_len >= L is the KV
  cache size (the most positions any row may reach).
  """
  model.check_tokens(tokens)
  length = tokens.shape[1]
  if max_len < length:
    raise ValueError(f"max_len {max_len} is shorter than the prompt batch length {length}")
  lengths = jnp.asarray(lengths, jnp.int32)
  x = model.embedding_layer(tokens)
  layers = []
  for block in model.blocks:
    def mix(h, block=block):
      if block.op == "MHA":
        out, layer_cache = _attention_prefill(block, h, max_len)
      else:
        out, layer_cache = _hyena_prefill(block, h, lengths)
      layers.append(layer_cache)
      return out
    x = residual_block(block, x, mix)
  last = last_steps(x, lengths, 1)                     # [B, 1, D]
  logits = model.embedding_layer.unembed(model.norm(last))[:, 0]
  return logits, Cache(lengths, tuple(layers))
