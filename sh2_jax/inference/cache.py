"""Fixed-size decoding caches, one per layer, as pytrees (NamedTuples of arrays).

Each mixer owns its cache's shape (``init_cache`` of ``FirFilter``, ``ModalFilter``,
``Attention``); per layer type (B batch, D width, K filter taps, N LI state, H heads x d):
  SE / MR  HyenaCache(z_hist [B, 3, 3D], state [B, K, D])  last inputs of featurizer / filter
  LI       HyenaCache(z_hist [B, 3, 3D], state [B, D, N] float32)  modal state
  MHA      KVCache(k [B, max_len, H, d], v [B, max_len, H, d])
``Cache.lengths`` [B] int32 counts the tokens each row has consumed, i.e. the position of its
next token; rows of one batch may be at different positions. History before a sequence's
start is zeros, as in the parallel forward's causal padding. The featurizer and SE/MR histories
are rings (``modes.to_ring``: position p in slot p mod K), written one slot per decoding step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sh2_jax.config import ModelConfig
from sh2_jax.model import StripedHyena
from sh2_jax.modes import Cache, HyenaCache, KVCache, last_steps, right_align

__all__ = ["Cache", "HyenaCache", "KVCache", "cache_bytes", "cache_shapes", "decode_read_bytes",
           "init_cache", "last_steps", "right_align"]


def _abstract_model(cfg: ModelConfig) -> StripedHyena:
  return nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  """The ShapeDtypeStructs of the model's cache (no allocation)."""
  model = _abstract_model(cfg)
  return jax.eval_shape(lambda: model.init_cache(batch, max_len))


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty cache (all rows at position 0)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes held by the decoding cache (from shapes only: no allocation)."""
  return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
             for s in jax.tree.leaves(cache_shapes(cfg, batch, max_len)))


def _nbytes(s) -> int:
  return math.prod(s.shape) * jnp.dtype(s.dtype).itemsize


def decode_read_bytes(cfg: ModelConfig, batch: int, position: int, max_len: int) -> dict[str, int]:
  """The bytes one decoding step at ``position`` must read (shapes only: no allocation):
  ``params`` every parameter at its stored dtype (the tied embedding once: the unembedding
  reads all of it), ``kv`` each attention layer's keys and values at positions 0..position
  (the new one included), ``states`` the Hyena layers' featurizer/FIR histories and LI modal
  states. Writes (the new key/value, the advanced states) are not counted."""
  if not 0 <= position < max_len:
    raise ValueError(f"position {position} is outside the cache's 0..{max_len - 1}")
  model = _abstract_model(cfg)
  params = sum(_nbytes(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kv = states = 0
  for layer in cache_shapes(cfg, batch, max_len).layers:
    if isinstance(layer, KVCache):
      kv += sum(_nbytes(x) * (position + 1) // x.shape[1] for x in layer)
    else:
      states += sum(_nbytes(x) for x in layer)
  return {"params": params, "kv": kv, "states": states}
