"""Multi-head causal self-attention with NeoX (rotate-half) RoPE, in every mode.

x: [B, L, D] -> [B, L, D]. ``Wqkv`` (no bias) produces [Q; K; V] (runtime order, each
head-major); heads of ``head_dim``; ``out_proj`` has a bias. One call for every mode of
``sh2_jax.modes``: ``attention(x, mode, cache) -> (y, KVCache or None)``. The softmax is the
callable ``dispatch.attention_fn`` resolves from ``attention_impl`` (cuDNN on GPU for
bf16/fp16, XLA elsewhere); partials and their merge are ``ops.attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sh2_jax import capture, dispatch
from sh2_jax.config import ModelConfig
from sh2_jax.layers import Dense, small_init, wang_init
from sh2_jax.modes import (FULL, ContextParallel, Decode, KVCache, Prefill, Segment, ShardedKV,
                           write_rows)
from sh2_jax.ops.attention import apply_rope, block_attention, merge, merge_across, rope_inv_freq
from sh2_jax.parallel.attention import cp_attention
from sh2_jax.parallel.zigzag import local_positions


class Attention(nnx.Module):
  """Module path ``inner_mha_cls``: ``Wqkv`` and ``out_proj`` as in the reference."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.Wqkv = Dense(d, 3 * d, use_bias=False, init=small_init(d), dtype=dt, param_dtype=pdt,
                      rngs=rngs)
    self.out_proj = Dense(d, d, use_bias=cfg.mha_out_bias, init=wang_init(d, cfg.num_layers),
                          dtype=dt, param_dtype=pdt, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.rope_base = cfg.rope_base
    self.rope_scale = cfg.rope_scale
    self.impl = cfg.attention_impl
    self.decode_impl = cfg.decode_attention_impl
    self.dtype = dt

  def qkv(self, x: jax.Array, positions: jax.Array):
    """x [B, L, D] -> q, k, v [B, L, H, d] with RoPE applied to q and k."""
    b, length, _ = x.shape
    qkv = self.Wqkv(x).reshape(b, length, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    inv_freq = rope_inv_freq(self.head_dim, self.rope_base)
    q = apply_rope(q, positions, inv_freq, self.rope_scale)
    k = apply_rope(k, positions, inv_freq, self.rope_scale)
    return q, k, v

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty KV cache of ``max_len`` positions."""
    kv = jnp.zeros((batch, max_len, self.num_heads, self.head_dim), self.dtype)
    return KVCache(kv, kv)

  def __call__(self, x: jax.Array, mode=FULL, cache: KVCache | None = None):
    """x [B, L, D] -> (y [B, L, D], the new KVCache or None)."""
    b, length, _ = x.shape
    scale = self.head_dim ** -0.5
    attend = dispatch.attention_fn(self.impl, self.dtype)
    if isinstance(mode, Decode):
      # Each row writes its K/V at its own position and attends to the keys before it (a
      # single-query step only streams the cache: decode_attention_impl).
      positions = mode.positions
      q, k, v = self.qkv(x, positions[:, None])
      cache = KVCache(write_rows(cache.k, positions, k[:, 0]),
                      write_rows(cache.v, positions, v[:, 0]))
      o = dispatch.decode_attention_fn(self.decode_impl, self.dtype)(
          q, cache.k, cache.v, positions + 1, scale)
    elif isinstance(mode, Segment):
      q, k, v = self.qkv(x, mode.offset + jnp.arange(length))
      if mode.kv is None:
        prefix, cache = _prefix_and_write(q, k, v, cache, mode.offset, scale, attend)
      else:
        prefix, cache = _sharded_prefix_and_write(q, k, v, cache, mode.offset, scale, attend,
                                                  mode.kv)
      diag = block_attention(q, k, v, None, True, scale, attend)
      o = merge(prefix, diag)[0].astype(q.dtype)
    elif isinstance(mode, ContextParallel):
      q, k, v = self.qkv(x, local_positions(length, mode.size, mode.axis_name))
      o = cp_attention(q, k, v, mode.axis_name, mode.size, scale, attend, mode.attention_mode)
    else:
      q, k, v = self.qkv(x, jnp.arange(length))
      o = attend(q, k, v, None, True, scale, False)
      if isinstance(mode, Prefill):
        cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k, 0, axis=1),
                        jax.lax.dynamic_update_slice_in_dim(cache.v, v, 0, axis=1))
    y = self.out_proj(o.reshape(b, length, -1))
    return capture.record(self, y), cache


def _prefix_and_write(q, k, v, cache: KVCache, offset, scale, attend):
  """Attention of the segment's queries to the cached keys before ``offset``, and the cache
  with the segment's keys/values written at ``offset``."""
  b = q.shape[0]
  # Write first, then read the written cache up to ``offset`` (the new keys sit past it): the
  # update is then the cache's only use and happens in place (read-then-write made XLA copy
  # the whole cache each segment).
  new = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k, offset, axis=1),
                jax.lax.dynamic_update_slice_in_dim(cache.v, v, offset, axis=1))
  prefix = block_attention(q, new.k, new.v, jnp.full((b,), offset, jnp.int32), False, scale,
                           attend)
  return prefix, new


def _sharded_prefix_and_write(q, k, v, cache: KVCache, offset, scale, attend, kv: ShardedKV):
  """``_prefix_and_write`` with the cache laid out as ``kv`` says: each rank attends to its
  visible keys (a prefix of its shard), the partials merge by log-sum-exp across ranks, and the
  rank owning the segment's block writes it."""
  n, stripe = kv.size, kv.stripe

  def local(q, k, v, kc, vc, offset):
    b, s = q.shape[:2]
    r = jax.lax.axis_index(kv.axis)
    g, within = offset // stripe, offset % stripe        # the segment's block, its place in it
    full = jnp.maximum(g - r + n - 1, 0) // n            # earlier blocks this rank holds
    mine = g % n == r
    visible = jnp.full((b,), full * stripe + jnp.where(mine, within, 0), jnp.int32)
    at = jnp.clip((g // n) * stripe + within, 0, kc.shape[1] - s)

    def write(c, x):  # first, so that it happens in place (see _prefix_and_write)
      old = jax.lax.dynamic_slice_in_dim(c, at, s, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(mine, x, old), at, axis=1)

    kc, vc = write(kc, k), write(vc, v)                  # the new keys sit past ``visible``
    out, lse = merge_across(block_attention(q, kc, vc, visible, False, scale, attend), kv.axis)
    return out, lse, kc, vc

  seq = jax.sharding.PartitionSpec(None, kv.axis)
  rep = jax.sharding.PartitionSpec()
  out, lse, kc, vc = jax.shard_map(
      local, mesh=kv.mesh, in_specs=(rep, rep, rep, seq, seq, rep),
      out_specs=(rep, rep, seq, seq))(q, k, v, cache.k, cache.v, offset)
  return (out, lse), KVCache(kc, vc)
