"""One decoding step through the recurrent forms of every layer.

tokens [B] (each row's next token, at position ``cache.lengths[b]``) + Cache -> logits [B, V]
float32 + the advanced Cache. Hyena layers: featurizer and SE/MR filters as one ``conv.fir_step``
over the cached window, LI as ``conv.modal_step``; attention writes its K/V at each row's own
position and attends to the keys before it. Everything else is the blocks' own modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax import conv
from sh2_jax.inference.cache import Cache, HyenaCache, KVCache
from sh2_jax.model import residual_block


def _hyena_step(block, h, cache: HyenaCache):
  """h = pre_norm(x) [B, 1, D] -> (mixer output [B, 1, D], new HyenaCache)."""
  filt = block.filter
  z = block.projections(h)                                   # [B, 1, 3D]
  z_win = jnp.concatenate([cache.z_hist, z], axis=1)         # [B, 3, 3D]
  zc = conv.fir_step(z_win, filt.featurizer_taps())[:, None]
  x2, x1, v = conv.interleaved_split(zc)
  new = {}

  def inner(u):  # u = x1 * v [B, 1, D], handed over by the gate
    if filt.op == "LI":
      y, new["state"] = conv.modal_step(cache.state, u[:, 0], filt.log_poles(),
                                        filt.residues[...])
    else:
      window = jnp.concatenate([cache.state, u], axis=1)    # [B, K, D]
      new["state"] = window[:, 1:]
      y = conv.fir_step(window, filt.fir_taps())
    return y[:, None]

  dskip = None if filt.D is None else filt.D[...]
  y = conv.gated_conv(x1, v, x2, inner, dskip)
  return block.out_filter_dense(y), HyenaCache(z_win[:, 1:], new["state"])


def _attention_step(block, h, cache: KVCache, positions):
  """h [B, 1, D], positions [B] -> (mixer output [B, 1, D], KVCache with this step written)."""
  attn = block.inner_mha_cls
  q, k, v = attn.qkv(h, positions[:, None])
  rows = jnp.arange(h.shape[0])
  k_cache = cache.k.at[rows, positions].set(k[:, 0])
  v_cache = cache.v.at[rows, positions].set(v[:, 0])
  return attn.attend(q, k_cache, v_cache, kv_lengths=positions + 1), KVCache(k_cache, v_cache)


def decode_step(model, cache: Cache, tokens: jax.Array):
  """tokens [B] int32 -> (logits [B, V] float32, Cache advanced by one position).

  Every row must stay below the KV cache's max_len (``generate`` sizes it so): JAX drops a
  scatter past the end, so such a step would silently lose its key and value.
  """
  positions = cache.lengths
  x = model.embedding_layer(tokens[:, None])               # [B, 1, D]
  layers = []
  for block, layer_cache in zip(model.blocks, cache.layers):
    def mix(h, block=block, layer_cache=layer_cache):
      if block.op == "MHA":
        out, new_cache = _attention_step(block, h, layer_cache, positions)
      else:
        out, new_cache = _hyena_step(block, h, layer_cache)
      layers.append(new_cache)
      return out
    x = residual_block(block, x, mix)
  logits = model.embedding_layer.unembed(model.norm(x))[:, 0]
  return logits, Cache(positions + 1, tuple(layers))
