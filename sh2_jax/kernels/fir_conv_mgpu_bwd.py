"""Backward of the Mosaic GPU gated FIR kernel (``fir_conv_mgpu.py``, which describes the
algorithm; tiling from ``fir_layout_mgpu.py``): one kernel for dx1, dv, dx2 and the per-program
dh / ddskip partials, and the small reduction pass after it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sh2_jax.kernels.fir_layout_mgpu import (Geometry, MgpuBlockSizes, band_rows, f32, fetch,
                                             fill_window, geometry, launch, matmul, pad,
                                             product, program, put, skip_rows, slide, smem,
                                             store, swizzled)


def _bwd_body(geo: Geometry, has_skip: bool):
  c, w, n = geo.chunk, geo.width, geo.bands

  def kernel(band_f_gmem, band_b_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, dy_gmem,
             dx1_gmem, dv_gmem, dx2_gmem, p_gmem, s_gmem,
             bf_smem, bb_smem, skip_smem, halo, u_win, dz_win, dzf_win, dy_win, stage, s_acc,
             p_stage):
    b, t, first, g, cols = program(geo)
    s_idx = jax.lax.axis_index("seg")
    pl.run_scoped(functools.partial(fetch, [(band_f_gmem.at[g], bf_smem),
                                            (band_b_gmem.at[g], bb_smem),
                                            (skip_gmem.at[:, cols], skip_smem)]),
                  plgpu.Barrier(num_barriers=3))
    fill_window(geo, [u_win], [first - n + m for m in range(n)], x1_gmem, v_gmem, b, cols,
                 halo)
    # dz twice: bf16 for the wgmmas, float32 for the skip term and ddskip (as the Triton
    # kernel); dy for dx2 = dy * z
    fill_window(geo, [dz_win, dzf_win, dy_win], [first + m for m in range(n)], dy_gmem,
                 x2_gmem, b, cols, halo, [product, product, lambda dy, x2: dy])
    s_acc[...] = jnp.zeros((c, w), f32)

    def run(p_acc):
      def step(idx, x1_ref, v_ref, x2n_ref, dyn_ref):
        (k,) = idx
        j = first + k
        x1, v = x1_ref[...], v_ref[...]
        u = x1 * v
        dy_n = dyn_ref[...].astype(f32)  # chunk j + n
        dz_n = dy_n * x2n_ref[...].astype(f32)
        u_win[pl.ds(n * c, c), :] = u
        dsts = [win.at[pl.ds(n * c, c)] for win in (dz_win, dzf_win, dy_win)]
        jax.lax.cond(j + n <= geo.last, lambda: put(dsts, [dz_n, dz_n, dy_n]),
                     lambda: put(dsts, [jnp.zeros((c, w), f32)] * 3))
        plgpu.commit_smem()
        z = matmul(bf_smem, u_win, (c, w))
        du = matmul(bb_smem, dz_win, (c, w))
        # dh partial: P += dz_j @ [U_{j-n}; …; U_j]^T, over this program's chunks.
        plgpu.wgmma(p_acc, dz_win.at[pl.ds(0, c)], u_win.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        u_f = u.astype(f32)
        dz_f = dzf_win[pl.ds(0, c), :]
        if has_skip:
          skip = skip_smem[...]
          z = z + skip * u_f
          du = du + skip * dz_f
        s_acc[...] += dz_f * u_f
        rows = pl.ds(j * c, c)
        store(dy_win[pl.ds(0, c), :].astype(f32) * z, stage.at[0],
               dx2_gmem.at[b, rows, cols])
        store(du * v.astype(f32), stage.at[1], dx1_gmem.at[b, rows, cols])
        store(du * x1.astype(f32), stage.at[2], dv_gmem.at[b, rows, cols])
        slide(u_win, geo)
        slide(dz_win, geo)
        slide(dzf_win, geo)
        slide(dy_win, geo)
        plgpu.commit_smem()

      cur = plgpu.BlockSpec((c, w), lambda k: (first + k, t), transforms=swizzled(w))
      ahead = plgpu.BlockSpec((c, w), lambda k: (jnp.minimum(first + k + n, geo.last), t),
                              transforms=swizzled(w))
      plgpu.emit_pipeline(step, grid=(geo.seg_chunks,), in_specs=[cur] * 2 + [ahead] * 2,
                          max_concurrent_steps=geo.stages)(
                              x1_gmem.at[b], v_gmem.at[b], x2_gmem.at[b], dy_gmem.at[b])
      return p_acc[...]

    p = pl.run_scoped(run, plgpu.ACC((c, (n + 1) * c), f32))
    plgpu.wait_smem_to_gmem(0)
    p_stage[...] = p
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(p_stage, p_gmem.at[b, t, s_idx])
    plgpu.copy_smem_to_gmem(s_acc, s_gmem.at[b, t, s_idx])
    plgpu.wait_smem_to_gmem(0)

  return kernel


def reduce_dh(p, geo: Geometry):
  """The reduction pass: partials [B, tiles, segs, c, (n+1)c] -> dh [G, K] float32
  (``dh[g, k] = sum_i P[i, n c + i - k]`` over the tiles of group g)."""
  c, n = geo.chunk, geo.bands
  m = p.sum(axis=(0, 2))  # [tiles, c, (n+1)c]
  lag_col = n * c + np.arange(c)[:, None] - np.arange(geo.taps)[None, :]  # [i, k] -> column
  diag = jnp.take_along_axis(m, jnp.asarray(lag_col)[None], axis=2).sum(axis=1)  # [tiles, K]
  return diag.reshape(geo.groups, geo.tiles_per_group, geo.taps).sum(axis=1)


def bwd(x1, v, x2, h, dskip, dy, bs: MgpuBlockSizes, interpret: bool = False):
  """Gradients (dx1, dv, dx2, dh [G, K] float32, ddskip [D] float32) of ``fwd``."""
  geo = geometry(x1.shape, h.shape, bs)
  c, w, n = geo.chunk, geo.width, geo.bands
  band_f, band_b = band_rows(h, c, n)
  xs = [pad(a, geo) for a in (x1, v, x2, dy.astype(x1.dtype))]
  parts = (geo.batch, geo.n_tiles, geo.n_segs)
  out_type = tuple(jax.ShapeDtypeStruct(xs[0].shape, x1.dtype) for _ in range(3)) + (
      jax.ShapeDtypeStruct(parts + (c, (n + 1) * c), f32),
      jax.ShapeDtypeStruct(parts + (c, w), f32))
  win = (n + 1) * c
  scratch = (smem((c, win), w), smem((c, win), w),                 # band rows fwd, bwd
             plgpu.SMEM((c, w), f32), smem((2, c, w)),               # dskip rows, halo
             smem((win, w)), smem((win, w)), plgpu.SMEM((win, w), f32),  # u, dz, dz (f32)
             smem((win, w)), smem((3, c, w)),                        # dy, staged outputs
             plgpu.SMEM((c, w), f32), plgpu.SMEM((c, win), f32))     # ddskip, dh partials
  dx1, dv, dx2, p, s = launch(_bwd_body(geo, dskip is not None), geo, out_type, scratch,
                              interpret, "gated_fir_bwd_mgpu")(
                                  band_f, band_b, skip_rows(dskip, geo), *xs)
  crop = lambda a: a[:, :geo.length]
  dd = s.sum(axis=(0, 2, 3)).reshape(geo.channels)
  return crop(dx1), crop(dv), crop(dx2), reduce_dh(p, geo), dd
