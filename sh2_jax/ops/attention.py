"""Attention math in plain jnp: NeoX (rotate-half) RoPE, attention over one block of keys as a
partial result (output, log-sum-exp), and the log-sum-exp merge of partials over disjoint key
sets -- within one device (``merge``) or across the ranks of a mesh axis (``merge_across``).

The softmax itself is a callable handed in (``dispatch.attention_fn``: XLA or cuDNN), so this
file names no backend. ``attend(q, k, v, kv_len, causal, scale, with_lse)`` takes q [B, T, H, d],
k, v [B, S, H, d], kv_len [B] int32 or None (keys >= kv_len masked) and returns out
[B, T, H, d] (with ``with_lse`` also lse [B, T, H] float32).

``block_attention`` has its own VJP: a fused kernel's VJP ignores the cotangent of the
log-sum-exp, which the merge needs. With p = softmax(scale q k^T):
d lse_i / d q_i = scale sum_j p_ij k_j (attention with V := K), and d lse_i / d k_j =
scale p_ij q_i (the V-gradient of attention with output cotangent scale * dlse * q).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def block_attention(q, k, v, kv_len, causal: bool, scale: float, attend):
  """Softmax attention of one block as a partial. q: [B, T, H, d]; k, v: [B, S, H, d]; kv_len:
  [B] int32 (keys >= kv_len masked; 0 allowed) or None. Returns (out [B, T, H, d],
  lse [B, T, H] float32); an empty block gives out 0 and lse -inf."""
  return _block_fwd(q, k, v, kv_len, causal, scale, attend)[0]


def _block_fwd(q, k, v, kv_len, causal, scale, attend):
  safe = None if kv_len is None else jnp.maximum(kv_len, 1)
  out, lse = attend(q, k, v, safe, causal, scale, True)
  if kv_len is not None:
    empty = (kv_len == 0)[:, None, None]
    lse = jnp.where(empty, -jnp.inf, lse)
    out = jnp.where(empty[..., None], 0, out)
  return (out, lse), (q, k, v, kv_len)


def _block_bwd(causal, scale, attend, res, g):
  q, k, v, kv_len = res
  dout, dlse = g
  safe = None if kv_len is None else jnp.maximum(kv_len, 1)
  if kv_len is not None:
    empty = (kv_len == 0)[:, None, None]
    dout = jnp.where(empty[..., None], 0, dout)
    dlse = jnp.where(empty, 0, dlse)
  att = lambda q_, k_, v_: attend(q_, k_, v_, safe, causal, scale, False)
  _, vjp = jax.vjp(att, q, k, v)
  dq, dk, dv = vjp(dout)
  w = (scale * dlse)[..., None]  # [B, T, H, 1]
  dq = dq + (w * att(q, k, k).astype(jnp.float32)).astype(dq.dtype)
  _, vjp_v = jax.vjp(lambda v_: att(q, k, v_), k)
  (dk_lse,) = vjp_v((w * q.astype(jnp.float32)).astype(q.dtype))
  return dq, dk + dk_lse, dv, None


block_attention.defvjp(_block_fwd, _block_bwd)


def merge(a, b):
  """Softmax-merge two partial attentions (out, lse) over disjoint key sets."""
  (oa, la), (ob, lb) = a, b
  lse = jnp.logaddexp(la, lb)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  wa = jnp.exp(la - safe)[..., None]
  wb = jnp.exp(lb - safe)[..., None]
  out = wa * oa.astype(jnp.float32) + wb * ob.astype(jnp.float32)
  return out, lse


def merge_across(part, axis_name: str):
  """``merge`` over the ranks of ``axis_name``: each rank holds a partial attention (out, lse)
  over its own disjoint key set; every rank gets the merged (out float32, lse)."""
  out, lse = part
  top = jax.lax.pmax(lse, axis_name)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top)  # 0 where this rank saw no key
  den = jax.lax.psum(w, axis_name)
  safe = jnp.where(den > 0, den, 1.0)
  out = jax.lax.psum(w[..., None] * out.astype(jnp.float32), axis_name) / safe[..., None]
  return out, jnp.where(den > 0, top + jnp.log(safe), -jnp.inf)
