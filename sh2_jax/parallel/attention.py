"""Context-parallel causal attention under the zig-zag layout.

Rank r holds queries/keys/values of chunks r and 2N-1-r ([B, 2c, H, d] each). A query chunk j
sees the keys of chunks < j in full and its own chunk causally, so its attention is the
softmax-merge of two blocks, each computed by ``jax.nn.dot_product_attention`` (cuDNN on GPU):
a full block and a causal (diagonal) block, merged through their log-sum-exps.

Two ways to bring the keys:
  ``allgather``  all-gather K and V (global order); for each local query chunk one block over the
                 prefix of keys (a padding mask of dynamic length j*c) plus the diagonal block.
  ``ring``       N-1 ``ppermute`` steps passing K/V around the ring; at step i rank r holds the
                 chunks of rank s = r-i (mod N) and computes only the visible part: both its query
                 chunks against chunk s when s < r, else its second chunk against both of s's.
                 Every rank does the same work per step (the point of zig-zag), memory stays 2c.

``ops.attention.block_attention`` gives each block's (out, lse) partial with its own VJP (the
fused kernels' VJP ignores the log-sum-exp's cotangent, which the merge needs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax.ops.attention import block_attention, merge


def _global_order(x, n):
  """All-gathered zig-zag rows [B, 2cN, ...] -> global order."""
  b, total = x.shape[:2]
  y = x.reshape(b, n, 2, total // (2 * n), *x.shape[2:])
  return jnp.concatenate([y[:, :, 0], y[:, ::-1, 1]], axis=1).reshape(x.shape)


def allgather_attention(q, k, v, axis_name: str, n: int, scale: float, attend):
  """q, k, v: [B, 2c, H, d] zig-zag shards -> causal attention output [B, 2c, H, d]."""
  b, l2 = q.shape[:2]
  c = l2 // 2
  kg = _global_order(jax.lax.all_gather(k, axis_name, axis=1, tiled=True), n)
  vg = _global_order(jax.lax.all_gather(v, axis_name, axis=1, tiled=True), n)
  r = jax.lax.axis_index(axis_name)
  outs = []
  for slot, chunk in ((0, r), (1, 2 * n - 1 - r)):
    sl = slice(slot * c, (slot + 1) * c)
    prefix_len = jnp.full((b,), chunk * c, jnp.int32)
    prefix = block_attention(q[:, sl], kg, vg, prefix_len, False, scale, attend)
    diag = block_attention(q[:, sl], k[:, sl], v[:, sl], None, True, scale, attend)
    outs.append(merge(prefix, diag)[0])
  return jnp.concatenate(outs, axis=1).astype(q.dtype)


def ring_attention(q, k, v, axis_name: str, n: int, scale: float, attend):
  """q, k, v: [B, 2c, H, d] zig-zag shards -> causal attention output [B, 2c, H, d]."""
  c = q.shape[1] // 2
  q0, q1 = q[:, :c], q[:, c:]
  att = lambda q_, k_, v_, causal: block_attention(q_, k_, v_, None, causal, scale, attend)
  o0, l0 = att(q0, k[:, :c], v[:, :c], True)  # chunk r: its own diagonal
  acc0 = (o0.astype(jnp.float32), l0)
  acc1 = merge(att(q1, k[:, c:], v[:, c:], True), att(q1, k[:, :c], v[:, :c], False))
  r = jax.lax.axis_index(axis_name)
  ring = [(i, (i + 1) % n) for i in range(n)]
  kv = (k, v)
  for step in range(1, n):
    kv = jax.lax.ppermute(kv, axis_name, ring)
    ks, vs = kv  # chunks s and 2N-1-s of rank s = r - step (mod N)
    s = (r - step) % n

    def earlier(accs, ks=ks, vs=vs):  # s < r: chunk s precedes both local query chunks
      o, l = att(q, ks[:, :c], vs[:, :c], False)
      return merge(accs[0], (o[:, :c], l[:, :c])), merge(accs[1], (o[:, c:], l[:, c:]))

    def later(accs, ks=ks, vs=vs):  # s > r: only chunk 2N-1-r sees both of s's chunks
      return accs[0], merge(accs[1], att(q1, ks, vs, False))

    acc0, acc1 = jax.lax.cond(s < r, earlier, later, (acc0, acc1))
  return jnp.concatenate([acc0[0], acc1[0]], axis=1).astype(q.dtype)


ATTENTION_MODES = {"allgather": allgather_attention, "ring": ring_attention}


def cp_attention(q, k, v, axis_name: str, n: int, scale: float, attend, mode: str):
  """Dispatch on the context-parallel attention mode (``allgather`` | ``ring``); ``attend`` is
  the softmax (``dispatch.attention_fn``)."""
  if mode not in ATTENTION_MODES:
    raise ValueError(f"context attention mode {mode!r} is not one of {sorted(ATTENTION_MODES)}")
  return ATTENTION_MODES[mode](q, k, v, axis_name, n, scale, attend)
