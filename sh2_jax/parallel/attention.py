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

``block_attention`` returns (out, lse) and has its own VJP: the fused kernels' VJP ignores the
cotangent of the log-sum-exp, which the merge needs. With p = softmax(scale q k^T):
d lse_i / d q_i = scale sum_j p_ij k_j (attention with V := K), and d lse_i / d k_j =
scale p_ij q_i (the V-gradient of attention with output cotangent scale * dlse * q).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sh2_jax.attention import resolve_attention_impl


def _cudnn_attention(q, k, v, kv_len, causal, scale):
  """cuDNN fused attention returning the float32 log-sum-exp ([B, T, H]); the public wrapper
  casts it to the input dtype, too coarse (bf16) for merging blocks."""
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


def _attention(q, k, v, kv_len, causal, scale, impl, with_lse):
  if impl == "cudnn" and with_lse:
    return _cudnn_attention(q, k, v, kv_len, causal, scale)
  res = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=kv_len,
      implementation=impl, return_residual=with_lse)
  if with_lse:
    return res[0], res[1].astype(jnp.float32)
  return res


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def block_attention(q, k, v, kv_len, causal: bool, scale: float, impl: str):
  """Softmax attention of one block. q: [B, T, H, d]; k, v: [B, S, H, d]; kv_len: [B] int32
  (keys >= kv_len masked; 0 allowed) or None. Returns (out [B, T, H, d], lse [B, T, H] f32);
  an empty block gives out 0 and lse -inf."""
  return _block_fwd(q, k, v, kv_len, causal, scale, impl)[0]


def _block_fwd(q, k, v, kv_len, causal, scale, impl):
  safe = None if kv_len is None else jnp.maximum(kv_len, 1)
  out, lse = _attention(q, k, v, safe, causal, scale, impl, True)
  if kv_len is not None:
    empty = (kv_len == 0)[:, None, None]
    lse = jnp.where(empty, -jnp.inf, lse)
    out = jnp.where(empty[..., None], 0, out)
  return (out, lse), (q, k, v, kv_len)


def _block_bwd(causal, scale, impl, res, g):
  q, k, v, kv_len = res
  dout, dlse = g
  safe = None if kv_len is None else jnp.maximum(kv_len, 1)
  if kv_len is not None:
    empty = (kv_len == 0)[:, None, None]
    dout = jnp.where(empty[..., None], 0, dout)
    dlse = jnp.where(empty, 0, dlse)
  att = lambda q_, k_, v_: _attention(q_, k_, v_, safe, causal, scale, impl, False)
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


def _global_order(x, n):
  """All-gathered zig-zag rows [B, 2cN, ...] -> global order."""
  b, total = x.shape[:2]
  y = x.reshape(b, n, 2, total // (2 * n), *x.shape[2:])
  return jnp.concatenate([y[:, :, 0], y[:, ::-1, 1]], axis=1).reshape(x.shape)


def allgather_attention(q, k, v, axis_name: str, n: int, scale: float, impl: str):
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
    prefix = block_attention(q[:, sl], kg, vg, prefix_len, False, scale, impl)
    diag = block_attention(q[:, sl], k[:, sl], v[:, sl], None, True, scale, impl)
    outs.append(merge(prefix, diag)[0])
  return jnp.concatenate(outs, axis=1).astype(q.dtype)


def ring_attention(q, k, v, axis_name: str, n: int, scale: float, impl: str):
  """q, k, v: [B, 2c, H, d] zig-zag shards -> causal attention output [B, 2c, H, d]."""
  c = q.shape[1] // 2
  q0, q1 = q[:, :c], q[:, c:]
  att = lambda q_, k_, v_, causal: block_attention(q_, k_, v_, None, causal, scale, impl)
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


def cp_attention(q, k, v, axis_name: str, n: int, scale: float, impl: str, mode: str,
                 dtype=None):
  """Dispatch on the context-parallel attention mode (``allgather`` | ``ring``)."""
  if mode not in ATTENTION_MODES:
    raise ValueError(f"context attention mode {mode!r} is not one of {sorted(ATTENTION_MODES)}")
  impl = resolve_attention_impl(impl, dtype or q.dtype)
  return ATTENTION_MODES[mode](q, k, v, axis_name, n, scale, impl)
