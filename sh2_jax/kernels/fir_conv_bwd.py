"""Backward of the gated grouped FIR kernel (``fir_conv.py``; tiling from ``fir_layout.py``):
one Pallas pass plus a small reduction.

With u = x1 * v, z = h * u + dskip * u, y = x2 * z and dz = dy * x2:

    dx2 = dy * z                       (z recomputed on chip: two dots per chunk)
    du  = H0^T dz_j + H1^T dz_{j+1} + dskip * dz      (two dots; dx1 = du * v, dv = du * x1)
    dh[g, k] = sum over t, channels of g of dz[t] u[t - k]
    ddskip   = sum over t of dz * u

The kernel walks each program's chunks forward, carrying u of the previous chunk and looking one
chunk ahead for dz. For dh it accumulates, per filter group it serves,
``M = where(i >= i', dz_j u_j^T, dz_j u_{j-1}^T)`` ([c, c], float32, two more dots per chunk): the
lag of entry (i, i') is ``(i - i') mod c``. Each program writes its M (the per-block partial
pass); ``reduce_dh`` then sums the partials and the circular diagonals (the reduction pass) —
no atomics. Same for ddskip with per-program column sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sh2_jax.kernels._pallas import call_pallas, dot, dot_precision, store
from sh2_jax.kernels.fir_layout import (BlockSizes, Layout, filter_table, make_layout, pad_to,
                                        subblock, toeplitz_slots)


def _dot_ta(a, b, precision):
  """a^T b for a: [c, c] (the transposed Toeplitz blocks without a second gather)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _bwd_kernel(table_ref, skip_ref, x1_ref, v_ref, x2_ref, dy_ref,
                dx1_ref, dv_ref, dx2_ref, mpart_ref, spart_ref, *, lay: Layout, has_skip: bool,
                precision):
  bs = lay.bs
  c, w = bs.chunk, bs.width
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first = si * lay.seg_chunks
  last_chunk = lay.num_chunks - 1
  dtype = x1_ref.dtype
  f32 = jnp.float32
  tri = (jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) >=
         jax.lax.broadcasted_iota(jnp.int32, (c, c), 1))

  subs = []
  for s in range(lay.subblocks):
    start, colmask, gids, slot_mask = subblock(lay, ti, s)
    cols = pl.ds(start, w)
    mats = toeplitz_slots(table_ref, lay, gids, slot_mask, dtype)
    skip = skip_ref[cols].astype(f32)[None, :] if has_skip else None
    subs.append((cols, mats, skip, colmask))

  def load(chunk, cols, refs):
    rows = pl.ds(jnp.minimum(chunk, last_chunk) * c, c)
    return tuple(r[b, rows, cols] for r in refs)

  def init(s):
    cols = subs[s][0]
    x1p, vp = load(jnp.maximum(first - 1, 0), cols, (x1_ref, v_ref))
    u_prev = jnp.where(first > 0, x1p * vp, jnp.zeros_like(x1p))
    maccs = tuple(jnp.zeros((c, c), f32) for _ in range(lay.slots))
    return ((u_prev,) + load(first, cols, (x1_ref, v_ref, x2_ref, dy_ref))
            + load(first + 1, cols, (x2_ref, dy_ref)) + (maccs, jnp.zeros((1, w), f32)))

  def step(k, carry, s):
    # Chunk j uses x1, v, x2, dy of chunk j and x2, dy of chunk j+1 (for du); the loads for the
    # next iteration are issued first (a software pipeline by hand).
    cols, mats, skip, colmask = subs[s]
    u_prev, x1, v, x2_cur, dy_cur, x2_n, dy_n, maccs, sacc = carry
    j = first + k
    rows = pl.ds(j * c, c)
    nxt = load(j + 1, cols, (x1_ref, v_ref)) + load(j + 2, cols, (x2_ref, dy_ref))
    u = x1 * v
    live = j < last_chunk
    dy_f = dy_cur.astype(f32)
    dz_f = dy_f * x2_cur.astype(f32)
    dz = dz_f.astype(dtype)
    dz_n = jnp.where(live, dy_n.astype(f32) * x2_n.astype(f32), 0.0).astype(dtype)
    z, du, new_m = None, None, []
    for (h0, h1, mask), m in zip((m() if callable(m) else m for m in mats), maccs):
      zp = dot(h0, u, precision) + dot(h1, u_prev, precision)
      dup = _dot_ta(h0, dz, precision) + _dot_ta(h1, dz_n, precision)
      dzm = dz
      if mask is not None:
        zp, dup = jnp.where(mask, zp, 0.0), jnp.where(mask, dup, 0.0)
        dzm = jnp.where(mask, dz, jnp.zeros_like(dz))
      z = zp if z is None else z + zp
      du = dup if du is None else du + dup
      m_cur = dot(dzm, u, precision, trans_b=True)
      m_prev = dot(dzm, u_prev, precision, trans_b=True)
      new_m.append(m + jnp.where(tri, m_cur, m_prev))
    u_f = u.astype(f32)
    if skip is not None:
      z = z + skip * u_f
      du = du + skip * dz_f
    store(dx2_ref, (b, rows, cols), (dy_f * z).astype(dx2_ref.dtype), colmask)
    store(dx1_ref, (b, rows, cols), (du * v.astype(f32)).astype(dx1_ref.dtype), colmask)
    store(dv_ref, (b, rows, cols), (du * x1.astype(f32)).astype(dv_ref.dtype), colmask)
    sacc = sacc + jnp.sum(dz_f * u_f, axis=0, keepdims=True)
    return (u,) + nxt[:2] + (x2_n, dy_n) + nxt[2:] + (tuple(new_m), sacc)

  def finish(s, carry):
    maccs, sacc = carry[-2], carry[-1]
    for j, m in enumerate(maccs):
      mpart_ref[b, ti, si, s, j, :, :] = m
    store(spart_ref, (b, si, pl.ds(0, 1), subs[s][0]), sacc, subs[s][3])

  if bs.chunk_outer:
    def body(k, carries):
      return tuple(step(k, carries[s], s) for s in range(lay.subblocks))
    out = jax.lax.fori_loop(0, lay.seg_chunks, body,
                            tuple(init(s) for s in range(lay.subblocks)))
    for s in range(lay.subblocks):
      finish(s, out[s])
  else:
    for s in range(lay.subblocks):
      finish(s, jax.lax.fori_loop(0, lay.seg_chunks, functools.partial(step, s=s), init(s)))


def slot_group_ids(lay: Layout) -> np.ndarray:
  """[n_tiles, subblocks, slots] group id of each partial (ids >= G belong to padding)."""
  t = np.arange(lay.n_tiles)[:, None, None]
  s = np.arange(lay.subblocks)[None, :, None]
  j = np.arange(lay.slots)[None, None, :]
  if lay.aligned:
    return t * lay.subblocks + s + j
  return (t * lay.bs.tile + s * lay.bs.width) // lay.group_size + j


def reduce_dh(mpart: jax.Array, lay: Layout) -> jax.Array:
  """The reduction pass: partials [B, tiles, segs, subblocks, slots, c, c] -> dh [G, K] f32."""
  c = lay.bs.chunk
  m = mpart.sum(axis=(0, 2))  # [tiles, subblocks, slots, c, c]
  lag_col = (np.arange(c)[:, None] - np.arange(c)[None, :]) % c  # [i, k] -> column i' with lag k
  diag = jnp.take_along_axis(m, jnp.asarray(lag_col)[None, None, None], axis=-1).sum(axis=-2)
  ids = slot_group_ids(lay).reshape(-1)
  dh = jax.ops.segment_sum(diag.reshape(-1, c), jnp.asarray(ids), num_segments=lay.groups)
  return dh[:, :lay.taps]


def bwd(x1, v, x2, h, dskip, dy, bs: BlockSizes, interpret: bool = False, poison: bool = False):
  """Gradients (dx1, dv, dx2, dh [G, K] f32, ddskip [D] f32) of ``fir_conv.fwd``."""
  lay = make_layout(x1.shape, h.shape, bs, jnp.dtype(x1.dtype).itemsize, backward=True)
  table = filter_table(h, lay.bs.chunk)
  skip = (jnp.zeros((lay.padded_channels,), jnp.float32) if dskip is None else
          jnp.pad(dskip.astype(jnp.float32), (0, lay.padded_channels - lay.channels)))
  xs = [pad_to(a, lay) for a in (x1, v, x2, dy.astype(x1.dtype))]
  n_tiles, n_segs = lay.grid[1], lay.grid[2]
  c = lay.bs.chunk
  out_shape = tuple(jax.ShapeDtypeStruct(xs[0].shape, x1.dtype) for _ in range(3)) + (
      jax.ShapeDtypeStruct((lay.batch, n_tiles, n_segs, lay.subblocks, lay.slots, c, c),
                           jnp.float32),
      jax.ShapeDtypeStruct((lay.batch, n_segs, 1, lay.padded_channels), jnp.float32))
  kernel = functools.partial(_bwd_kernel, lay=lay, has_skip=dskip is not None,
                             precision=dot_precision(x1.dtype))
  dx1, dv, dx2, mpart, spart = call_pallas(kernel, out_shape, lay.grid, lay.bs, interpret,
                                           "gated_fir_bwd", poison, table, skip, *xs)
  crop = lambda a: a[:, :lay.length, :lay.channels]
  dd = spart.sum(axis=(0, 1, 2))[:lay.channels]
  return crop(dx1), crop(dv), crop(dx2), reduce_dh(mpart, lay), dd
