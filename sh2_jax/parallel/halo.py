"""Point-to-point halo exchange for the causal FIR filters (featurizer, SE, MR) under zig-zag.

A causal filter of K taps makes output t depend on inputs t-K+1 .. t, so only the first K-1
outputs of a chunk need anything from outside it: the last ``halo = K-1`` inputs before the chunk.
Rank r holds chunks r (slot 0) and 2N-1-r (slot 1); the predecessor of chunk r is chunk r-1 on
rank r-1 (nothing before chunk 0), the predecessor of chunk 2N-1-r is chunk 2N-2-r on rank r+1,
and for r = N-1 it is the rank's own slot 0. Each needed tail is sent with ``lax.ppermute``.
When a chunk is shorter than the halo (c < K-1) the halo spans several predecessor chunks; the
same rule is applied per chunk offset.

The local work runs the ordinary operator (the configured gated core handed in — the Pallas
kernel on GPU — or ``fir.featurizer_conv``) on the two chunks as a batch of 2B independent sequences, then adds
the contribution of the halo to the first min(K-1, c) outputs: by linearity that is the filter
applied to [halo, zeros] (``fir.fir_conv`` on 2(K-1) tokens — negligible work).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sh2_jax.ops import fir
from sh2_jax.parallel.zigzag import merge_chunks, split_chunks


def _source(slot: int, r: int, s: int, n: int) -> tuple[int, int] | None:
  """(rank, slot) holding global chunk (chunk of (r, slot)) - s, or None before the start."""
  j = r if slot == 0 else 2 * n - 1 - r
  i = j - s
  if i < 0:
    return None
  return (i, 0) if i < n else (2 * n - 1 - i, 1)


def chunk_halos(u: jax.Array, halo: int, axis_name: str, n: int) -> jax.Array:
  """The ``halo`` tokens before each of this rank's chunks (zeros before token 0).

  u: [B, 2, c, C] (this rank's two chunks, or just their last min(c, halo) rows — all a
  halo can use). Returns [B, 2, halo, C].
  """
  b, _, c, ch = u.shape
  pieces = [[], []]  # per destination slot, from the farthest predecessor to the nearest
  for s in range(math.ceil(halo / c), 0, -1):
    take = min(c, halo - (s - 1) * c)  # tokens of predecessor chunk j-s that are needed
    for dst in (0, 1):
      piece = jnp.zeros((b, take, ch), u.dtype)
      for src in (0, 1):
        perm = []
        for r in range(n):
          where = _source(dst, r, s, n)
          if where is not None and where[1] == src:
            perm.append((where[0], r))
        if perm:
          piece = piece + jax.lax.ppermute(u[:, src, c - take:], axis_name, perm)
      pieces[dst].append(piece)
  halos = [jnp.concatenate(p, axis=1) if len(p) > 1 else p[0] for p in pieces]
  return jnp.stack(halos, axis=1)


def halo_contribution(u_halo: jax.Array, h: jax.Array, c: int) -> jax.Array:
  """What the halo adds to the first outputs of a chunk. u_halo: [b, halo, C]; h: [G, halo+1]
  (true convolution). Returns [b, min(halo, c), C] in float32."""
  halo = u_halo.shape[1]
  k = min(halo, c)
  ext = jnp.concatenate([u_halo, jnp.zeros((u_halo.shape[0], k, u_halo.shape[2]), u_halo.dtype)],
                        axis=1)
  return fir.fir_conv(ext.astype(jnp.float32), h)[:, halo:]


def _as_batch(x):  # [B, 2c, C] -> [2B, c, C]: the two chunks as independent sequences
  xc = split_chunks(x)
  return xc.reshape(-1, *xc.shape[2:])


def _from_batch(y, b):  # [2B, c, C] -> [B, 2c, C]
  return merge_chunks(y.reshape(b, 2, *y.shape[1:]))


def halo_fir_conv(u: jax.Array, h: jax.Array, axis_name: str, n: int, local_conv=None):
  """Causal FIR of the zig-zag shard u: [B, 2c, C] with h: [G, K] (true convolution), equal to
  the filter over the whole sequence. ``local_conv(u, h)`` defaults to ``fir.fir_conv``."""
  local_conv = local_conv or fir.fir_conv
  b, l2, _ = u.shape
  c = l2 // 2
  y = local_conv(_as_batch(u), h).astype(jnp.float32).reshape(b, 2, c, -1)
  halo = h.shape[1] - 1
  if halo:
    uc = split_chunks(u)
    uh = chunk_halos(uc[:, :, c - min(c, halo):], halo, axis_name, n)
    add = halo_contribution(uh.reshape(2 * b, halo, -1), h, c).reshape(b, 2, min(halo, c), -1)
    y = y.at[:, :, :add.shape[2]].add(add)
  return merge_chunks(y).astype(u.dtype)


def halo_featurizer(z: jax.Array, taps: jax.Array, axis_name: str, n: int) -> jax.Array:
  """The featurizer (``fir.featurizer_conv``, taps [3D, 3]) on the zig-zag shard z: [B, 2c, 3D]."""
  return halo_fir_conv(z, taps, axis_name, n, local_conv=fir.featurizer_conv)


def halo_gated_fir(x1, v, x2, h, dskip, core, axis_name: str, n: int) -> jax.Array:
  """SE/MR on the zig-zag shard: the gated core ``core(x1, v, x2, h, dskip)``
  (``dispatch.fir_fn``: the fused Pallas kernel on GPU) on each chunk, plus ``x2 * (halo contribution)`` on each chunk's first K-1 outputs.
  x1, v, x2: [B, 2c, D]; h: [G, K] (true convolution); dskip: [D] or None."""
  b, l2, d = x1.shape
  c = l2 // 2
  y = core(_as_batch(x1), _as_batch(v), _as_batch(x2), h, dskip)
  halo = h.shape[1] - 1
  if not halo:
    return _from_batch(y, b)
  tail = c - min(c, halo)  # only the rows that can be a halo: u = x1 * v on those alone
  u = split_chunks(x1)[:, :, tail:] * split_chunks(v)[:, :, tail:]
  uh = chunk_halos(u, halo, axis_name, n).reshape(2 * b, halo, d)
  add = halo_contribution(uh, h, c)  # [2B, k, D] float32
  k = add.shape[1]
  head = (y[:, :k].astype(jnp.float32)
          + _as_batch(x2)[:, :k].astype(jnp.float32) * add).astype(y.dtype)
  return _from_batch(jax.lax.dynamic_update_slice_in_dim(y, head, 0, axis=1), b)
