"""Multi-head causal self-attention with NeoX (rotate-half) RoPE.

x: [B, L, D] -> [B, L, D]. ``Wqkv`` (no bias) produces [Q; K; V] (runtime order, each
head-major); heads of ``head_dim``; ``out_proj`` has a bias. The softmax runs through
``jax.nn.dot_product_attention``: cuDNN on GPU for bf16/fp16, XLA elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sh2_jax import capture
from sh2_jax.config import ModelConfig
from sh2_jax.layers import Dense, small_init, wang_init


def rope_inv_freq(head_dim: int, base: float) -> jax.Array:
  """``base^(-arange(0, d, 2) / d)``: [d/2] float32."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0):
  """Rotate-half RoPE. x: [B, L, H, d]; positions: [B, L] or [L] (absolute, int or float)."""
  pos = positions.astype(jnp.float32) / scale
  freqs = pos[..., None] * inv_freq  # [.., L, d/2]
  cos = jnp.concatenate([jnp.cos(freqs)] * 2, axis=-1)
  sin = jnp.concatenate([jnp.sin(freqs)] * 2, axis=-1)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def resolve_attention_impl(impl: str, dtype) -> str | None:
  """Config value -> the ``implementation`` argument of ``jax.nn.dot_product_attention``."""
  if impl == "auto":
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention_impl 'cudnn' needs a GPU backend, not {jax.default_backend()!r}")
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention_impl 'cudnn' needs dtype bfloat16 or float16, not {dtype}")
  return impl


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

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.qkv(x, jnp.arange(x.shape[1]))
    return capture.record(self, self.attend(q, k, v))

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
             kv_lengths: jax.Array | None = None) -> jax.Array:
    """Softmax attention + ``out_proj``: q [B, Lq, H, d], k, v [B, Lk, H, d] -> [B, Lq, D].

    Causal over the whole sequence, or (``kv_lengths`` [B], decoding against a fixed-size KV
    cache) each query sees the keys ``0 .. kv_lengths[b]-1``; that path is XLA's, since a
    single-query step only streams the cache.
    """
    b, lq, h, d = q.shape
    if kv_lengths is None:
      o = jax.nn.dot_product_attention(
          q, k, v, scale=self.head_dim ** -0.5, is_causal=True,
          implementation=resolve_attention_impl(self.impl, self.dtype))
    else:
      o = jax.nn.dot_product_attention(
          q, k, v, scale=self.head_dim ** -0.5, key_value_seq_lengths=kv_lengths,
          implementation="xla")
    return self.out_proj(o.reshape(b, lq, h * d))
