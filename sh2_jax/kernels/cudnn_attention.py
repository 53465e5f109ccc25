"""cuDNN fused attention with its float32 log-sum-exp.

The public ``jax.nn.dot_product_attention(..., return_residual=True)`` casts the log-sum-exp to
the input dtype, too coarse (bf16) for merging attention partials, so this kernel wrapper calls
JAX's cuDNN lowering directly. It is the one file that touches that private API; everything
else reaches it through ``dispatch.attention_fn``.

q: [B, T, H, d]; k, v: [B, S, H, d]; kv_len: [B] int32 or None. Returns (out [B, T, H, d],
lse [B, T, H] float32).
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
