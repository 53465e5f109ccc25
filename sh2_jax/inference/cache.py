"""Fixed-size decoding caches, one per layer, as pytrees (NamedTuples of arrays).

Per layer type (B batch, D width, K filter taps, N LI state, H heads x d head dim):
  SE / MR  HyenaCache(z_hist [B, 2, 3D], state [B, K-1, D])  last inputs of featurizer / filter
  LI       HyenaCache(z_hist [B, 2, 3D], state [B, D, N] float32)  modal state
  MHA      KVCache(k [B, max_len, H, d], v [B, max_len, H, d])
``Cache.lengths`` [B] int32 counts the tokens each row has consumed, i.e. the position of its
next token; rows of one batch may be at different positions. History before a sequence's
start is zeros, as in the parallel forward's causal padding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig


class HyenaCache(NamedTuple):
  z_hist: jax.Array  # [B, featurizer_len - 1, 3D], compute dtype
  state: jax.Array   # SE/MR: [B, K-1, D] compute dtype; LI: [B, D, N] float32


class KVCache(NamedTuple):
  k: jax.Array  # [B, max_len, H, d], RoPE applied
  v: jax.Array


class Cache(NamedTuple):
  lengths: jax.Array  # [B] int32
  layers: tuple       # one HyenaCache / KVCache per block


def layer_cache_shapes(cfg: ModelConfig, op: str, batch: int, max_len: int):
  """The ShapeDtypeStructs of one layer's cache."""
  dt = jnp.dtype(cfg.dtype)
  d = cfg.d_model
  if op == "MHA":
    kv = jax.ShapeDtypeStruct((batch, max_len, cfg.num_heads, cfg.head_dim), dt)
    return KVCache(kv, kv)
  z_hist = jax.ShapeDtypeStruct((batch, cfg.featurizer_len - 1, 3 * d), dt)
  if op == "LI":
    return HyenaCache(z_hist, jax.ShapeDtypeStruct((batch, d, cfg.li_state), jnp.float32))
  taps = cfg.se_len if op == "SE" else cfg.mr_len
  return HyenaCache(z_hist, jax.ShapeDtypeStruct((batch, taps - 1, d), dt))


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  return Cache(jax.ShapeDtypeStruct((batch,), jnp.int32),
               tuple(layer_cache_shapes(cfg, op, batch, max_len) for op in cfg.layer_types))


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty cache (all rows at position 0)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes held by the decoding cache (from shapes only: no allocation)."""
  return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
             for s in jax.tree.leaves(cache_shapes(cfg, batch, max_len)))


def last_steps(x: jax.Array, lengths: jax.Array, n: int) -> jax.Array:
  """The last n steps of each row before its length: x [B, L, C], lengths [B] -> [B, n, C],
  ``out[b, i] = x[b, lengths[b] - n + i]``, zeros where that index is negative."""
  idx = lengths[:, None] - n + jnp.arange(n)[None, :]  # [B, n]
  out = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1)[..., None], axis=1)
  return jnp.where((idx >= 0)[..., None], out, jnp.zeros_like(out))


def right_align(x: jax.Array, lengths: jax.Array) -> jax.Array:
  """Shift each row so its step ``lengths[b]-1`` lands at index L-1, zeros before its start:
  x [B, L, C] -> [B, L, C]. Makes right-padded rows look like sequences of the full length."""
  length = x.shape[1]
  idx = lengths[:, None] - length + jnp.arange(length)[None, :]  # [B, L] source index
  out = jnp.take_along_axis(x, jnp.clip(idx, 0, length - 1)[..., None], axis=1)
  return jnp.where((idx >= 0)[..., None], out, jnp.zeros_like(out))
