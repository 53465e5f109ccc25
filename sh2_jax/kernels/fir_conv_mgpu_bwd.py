"""Backward of the Mosaic GPU gated FIR kernel (``fir_conv_mgpu.py``, which describes the
algorithm; tiling from ``fir_layout_mgpu.py``): one kernel for dx1, dv, dx2 and the per-program
dh / ddskip partials, and the small reduction pass after it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sh2_jax.kernels.fir_layout_mgpu import (Geometry, MgpuBlockSizes, ahead_rows, band_a,
                                             band_at, band_copies, band_rows, f32, first_arg,
                                             geometry, launch, p_pieces, pad, past_rows,
                                             product, program, prologue, put, second_arg,
                                             skip_rows, slide, slot, smem, split_streams,
                                             stage_buffer, store, stream_specs)


def _bwd_body(geo: Geometry, has_skip: bool):
  c, w, n, nt, k = geo.chunk, geo.width, geo.bands, geo.tiles, geo.tail
  # the dh accumulators: (tile, lag, first column, width), ``p_pieces`` of each lag
  pieces = [(i, m, col, width) for i in range(nt) for m in range(n + 1)
            for col, width in p_pieces(c, n, k, m)]
  widths = sorted({width for _, _, _, width in pieces})

  def kernel(band_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, dy_gmem,
             dx1_gmem, dv_gmem, dx2_gmem, p_gmem, s_gmem, band_smem, tail_f, *scratch):
    # H_n's k rows for du, unless k = c (then its whole block, tail_f, serves both)
    tail_b, (u_win, dz_win, x2_win, dy_win, stage) = ((scratch[0], scratch[1:]) if k < c
                                                      else (tail_f, scratch))
    b, first, tiles = program(geo)
    s_idx = jax.lax.axis_index("seg")
    # the halo: past u, and future dz (bf16, for the wgmmas), x2 and dy (dx2 = dy * z; the skip
    # term and ddskip take dz = dy * x2 in float32, exact for bf16 factors, as the Triton kernel)
    fills = [(x1_gmem, v_gmem, cols, first - n + m, [u_win.at[i, slot(geo, first, m - n)]],
              [product]) for i, (_, _, cols) in enumerate(tiles) for m in range(n)]
    fills += [(dy_gmem, x2_gmem, cols, first + m,
               [win.at[i, slot(geo, first, m, True)] for win in (dz_win, x2_win, dy_win)],
               [product, second_arg, first_arg]) for i, (_, _, cols) in enumerate(tiles)
              for m in range(n)]
    copies = band_copies(geo, tiles, band_gmem, band_smem, tail_f, tail_b if k < c else None)
    skips = prologue(geo, b, tiles, copies, skip_gmem if has_skip else None, fills)

    def run(*p_accs):  # p_accs[q]: the dh partial of pieces[q]
      def step(idx, *refs):
        (k,), s_carry = idx, refs[-1]
        j = first + k
        x1s, vs, x2ns, dyns = split_streams(geo, refs[:-1], 4)
        x1s, vs = [r[...] for r in x1s], [r[...] for r in vs]
        us = [x1.astype(f32) * v.astype(f32) for x1, v in zip(x1s, vs)]
        put([u_win.at[i, slot(geo, j, 0)] for i in range(nt)], us)
        ahead = slot(geo, j, n, ahead=True)
        for i in range(nt):
          dy_n, x2_n = dyns[i][...], x2ns[i][...]  # chunk j + n
          dz_n = dy_n.astype(f32) * x2_n.astype(f32)
          dsts = [win.at[i, ahead] for win in (dz_win, x2_win, dy_win)]
          jax.lax.cond(j + n <= geo.last, lambda: put(dsts, [dz_n, x2_n, dy_n]),
                       lambda: put(dsts, [jnp.zeros((c, w), f32)] * 3))
        plgpu.commit_smem()

        cur = slot(geo, j, 0, ahead=True)

        def mm(*accs):  # z and du of every tile, and the dh partials; reading waits for all
          for i in range(nt):
            for m in range(n + 1):
              plgpu.wgmma(accs[i], band_a(geo, band_smem, tail_f, i, m),
                          u_win.at[i, slot(geo, j, -m)].at[past_rows(geo, m)])
              plgpu.wgmma(accs[nt + i], band_at(geo, band_smem, tail_b, i, m),
                          dz_win.at[i, slot(geo, j, m, True)].at[ahead_rows(geo, m)])
          # P_m += dz_j @ U_{j-m}^T over this program's chunks, by column pieces
          for acc, (i, m, col, width) in zip(p_accs, pieces):
            past = u_win.at[i, slot(geo, j, -m)].at[pl.ds(col, width)]
            plgpu.wgmma(acc, dz_win.at[i, cur], past.transpose((1, 0)))
          return [acc[...] for acc in accs]
        zdu = pl.run_scoped(mm, *[plgpu.ACC((c, w), f32)] * (2 * nt))
        outs, s_next = [[], [], []], []  # dx2, dx1, dv per tile
        for i in range(nt):
          z, du, u_f = zdu[i], zdu[nt + i], us[i]
          dy_f = dy_win[i, cur].astype(f32)
          dz_f = dy_f * x2_win[i, cur].astype(f32)
          if has_skip:
            skip = skips[i]
            z = z + skip * u_f
            du = du + skip * dz_f
          s_next.append(s_carry[i] + dz_f * u_f)
          for out, val in zip(outs, (dy_f * z, du * vs[i].astype(f32),
                                     du * x1s[i].astype(f32))):
            out.append(val)
        store(outs, stage, [dx2_gmem, dx1_gmem, dv_gmem], b, pl.ds(j * c, c), tiles, k, geo)
        slide([win.at[i] for win in (u_win, dz_win, x2_win, dy_win) for i in range(nt)], geo)
        return tuple(s_next)

      cur = stream_specs(geo, tiles, lambda k: first + k)
      ahead = stream_specs(geo, tiles, lambda k: jnp.minimum(first + k + n, geo.last))
      s_acc = plgpu.emit_pipeline(
          step, grid=(geo.seg_chunks,), in_specs=cur * 2 + ahead * 2,
          max_concurrent_steps=geo.stages,
          init_carry=tuple(jnp.zeros((c, w), f32) for _ in range(nt)))(
              *[a.at[b] for a in (x1_gmem, v_gmem, x2_gmem, dy_gmem) for _ in cur])
      return [acc[...] for acc in p_accs], list(s_acc)

    ps, ss = pl.run_scoped(run, *[plgpu.ACC((c, width), f32) for _, _, _, width in pieces])

    def write_partials(s_stage, *p_stages):  # scoped: reuses the input pipeline's shared memory
      stage_of = dict(zip(widths, p_stages))
      for q, (i, m, col, width) in enumerate(pieces):  # one piece at a time
        t = tiles[i][0]
        plgpu.wait_smem_to_gmem(0)  # the steps' copies, or the previous piece's
        first_piece = q == 0 or pieces[q - 1][0] != i
        put([stage_of[width]] + ([s_stage] if first_piece else []), [ps[q], ss[i]])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage_of[width], p_gmem.at[b, t, s_idx, pl.ds((n - m) * c, c),
                                                            pl.ds(col, width)])
        if first_piece:
          plgpu.copy_smem_to_gmem(s_stage, s_gmem.at[b, t, s_idx])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(write_partials, plgpu.SMEM((c, w), f32),
                  *[plgpu.SMEM((c, width), f32) for width in widths])

  return kernel


def reduce_dh(p, geo: Geometry):
  """The reduction pass: partials [B, tiles, segs, (n+1)c, c] (rows of block n - m: lag m) ->
  dh [G, K] float32 (``dh[g, k] = sum_i P[i, n c + i - k]`` over the tiles of group g, with P
  the blocks side by side, [c, (n+1)c]). Short filters (lags 0..K-1 a quarter of P or less:
  SE reads 7 of 128 columns a row) gather their diagonals before summing over batch and
  segments, so only those entries are read; longer ones sum first and gather from the sum.
  The last band's block (rows 0 … c-1) holds only its k columns (``p_pieces``); the others are
  never written and never gathered."""
  c, n = geo.chunk, geo.bands
  col = n * c + np.arange(c)[:, None] - np.arange(geo.taps)[None, :]  # [i, k] -> P's column
  rows, cols = (col // c) * c + np.arange(c)[:, None], col % c        # -> partial's row, column
  if 4 * geo.taps <= (n + 1) * c:
    diag = p[:, :, :, rows, cols].sum(axis=(0, 2, 3))  # [tiles, K]
  else:
    diag = p.sum(axis=(0, 2))[:, rows, cols].sum(axis=1)
  return diag.reshape(geo.groups, geo.tiles_per_group, geo.taps).sum(axis=1)


def bwd(x1, v, x2, h, dskip, dy, bs: MgpuBlockSizes, interpret: bool = False):
  """Gradients (dx1, dv, dx2, dh [G, K] float32, ddskip [D] float32) of ``fwd``."""
  geo = geometry(x1.shape, h.shape, bs)
  c, w, n, nt = geo.chunk, geo.width, geo.bands, geo.tiles
  xs = [pad(a, geo) for a in (x1, v, x2, dy.astype(x1.dtype))]
  parts = (geo.batch, geo.n_tiles, geo.n_segs)
  out_type = tuple(jax.ShapeDtypeStruct(xs[0].shape, x1.dtype) for _ in range(3)) + (
      jax.ShapeDtypeStruct(parts + ((n + 1) * c, c), f32),
      jax.ShapeDtypeStruct(parts + (c, w), f32))
  win = (nt, n + 1, c, w)
  k = geo.tail
  scratch = (smem((nt, n, c, c), w), smem((nt, c, k), w))    # H_0 … H_{n-1}; H_n[:, c-k:]
  if k < c:
    scratch += (smem((nt, k, c), w),)                          # H_n[:k], for du
  scratch += (smem(win), smem(win), smem(win), smem(win),     # u, dz, x2, dy
              stage_buffer(geo, 3))                            # staged dx2 dx1 dv
  dx1, dv, dx2, p, s = launch(_bwd_body(geo, dskip is not None), geo, out_type, scratch,
                              interpret, "gated_fir_bwd_mgpu")(
                                  band_rows(h, c, n), skip_rows(dskip, geo), *xs)
  crop = lambda a: a[:, :geo.length]
  dd = s.sum(axis=(0, 2, 3)).reshape(geo.channels)
  return crop(dx1), crop(dv), crop(dx2), reduce_dh(p, geo), dd
