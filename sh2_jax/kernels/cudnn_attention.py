"""cuDNN fused attention with its float32 log-sum-exp.

The public ``jax.nn.dot_product_attention(..., return_residual=True)`` casts the log-sum-exp to
the input dtype, too coarse (bf16) for merging attention partials, so this kernel wrapper calls
JAX's cuDNN lowering directly. It is the one file that touches that private API; everything
else reaches it through ``dispatch.attention_fn``.

q: [B, T, H, d]; k, v: [B, S, H, d]; kv_len: [B] int32 or None. Returns (out [B, T, H, d],
lse [B, T, H] float32).

``even_lengths`` pads odd query and key lengths by one position: JAX 0.11's cuDNN lowering
refuses the backward of every odd length (``Unsupported sequence length Q 127, KV 127``: its
check takes the empty bias placeholder for a bias, and biased cuDNN training needs even
lengths), so MAD's length 127 or any odd training length failed under ``attention_impl`` auto on
a GPU.
"""

from __future__ import annotations

import jax.numpy as jnp


def attention_with_lse(q, k, v, kv_len, causal: bool, scale: float):
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
  b, t = q.shape[:2]
  if kv_len is None:
    mask = MaskType.CAUSAL if causal else MaskType.NO_MASK
    q_len = None
  else:
    mask = MaskType.PADDING_CAUSAL if causal else MaskType.PADDING
    q_len = jnp.full((b,), t, jnp.int32)
  out, lse = dot_product_attention(q, k, v, q_seqlen=q_len, kv_seqlen=kv_len, scale=scale,
                                   mask_type=mask, return_residual=True)
  return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)


def even_lengths(attend):
  """``attend(q, k, v, kv_len, causal, scale, with_lse)`` for odd lengths through even ones:
  q, k and v get one zero position at the end where their length is odd, the padded key is
  masked (by causality where it lies after every real query, else by ``kv_len``), and the
  padded query's row is dropped. Exact: no real query sees the padded key, and the padded
  query attends real keys (no fully masked row to put NaN into the backward)."""
  def padded(q, k, v, kv_len, causal, scale, with_lse):
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if t % 2 == 0 and s % 2 == 0:
      return attend(q, k, v, kv_len, causal, scale, with_lse)
    one = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
    if s % 2 and kv_len is None and (not causal or t > s):
      kv_len = jnp.full((b,), s, jnp.int32)
    res = attend(one(q, t), one(k, s), one(v, s), kv_len, causal, scale, with_lse)
    if with_lse:
      return res[0][:, :t], res[1][:, :t]
    return res[:, :t]
  return padded

