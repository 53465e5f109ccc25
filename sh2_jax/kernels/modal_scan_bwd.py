"""Backward of the chunked modal recurrence (``modal_scan.py``): the adjoint recurrence, run
backward in time with the same poles, in one Pallas pass.

With u = x1 * v, s_t = a s_{t-1} + u_t (a = exp(lambda), per channel and state n),
z_t = sum_n R_n s_t + dskip u_t, y = x2 * z and g = dy * x2, the cotangent of the state
Q_t = R g_t + a Q_{t+1} (plus the final-state cotangent at t = L-1) gives

    dx2 = dy * z                          (z saved by the forward)
    du_t = sum_n Q_t[n] + dskip g_t       (dx1 = du * v, dv = du * x1)
    dR_n = sum_t g_t s_t[n],   dlambda_n = sum_t Q_t[n] a_n s_{t-1}[n],   ds0 = a Q_0

As sums over pairs (impulse i, source j <= i), dR weighs g_i u_j by a^(i-j) and dlambda weighs
R g_i u_j by (i-j) a^(i-j). A program walks its chunks from the last to the first carrying,
with respect to the row just before the part already walked (every exponent >= 0):

    W  = sum_i a^D R g_i  (+ a^D ds_final)   the cotangent of the state before that part
    W' = sum_i D a^D R g_i (+ ...)           its lambda-weighted twin (D = distance of impulse i)
    Wg = sum_i a^D g_i                       unweighted, for dR

Per chunk: du = T^T g + B W (B[j] = a^(c-1-j)); the pairs (later impulse, source in this chunk)
give dR += (B u) Wg and dlambda += (B u) W' + (B (delta u)) W with delta = c-1-j; then
W <- a^c W + R (A g), W' <- a^c (W' + c W) + R (A (i+1) g), Wg <- a^c Wg + A g
(A[i] = a^(i+1)). Pairs inside one chunk have the same lags in every chunk: the kernel sums the
outer products P[i, j] = sum_chunks g_i u_j ([c, c, tile]) and contracts P with a^(i-j) and
(i-j) a^(i-j) once at the end. The initial state pairs with everything: dR += s0 Wg,
dlambda += s0 W', ds0 = W. dR, dlambda, ddskip leave as per-(batch, tile) partials summed here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sh2_jax.kernels._pallas import call_pallas
from sh2_jax.kernels.modal_geometry import (F32, BlockSizes, Geometry, column, decay_tables,
                                            lag_table, make_geometry, pad_inputs, pad_params,
                                            pad_state, segment_tail, walk)


def _intra_pairs(p, lam, res, chunk):
  """From P [c, c, tile] (rows i: impulse, cols j: source): dR and dlambda of the pairs inside
  one chunk, both [tile, N]."""
  i = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk, 1), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk, 1), 1)
  lag = jnp.maximum(i - j, 0).astype(F32)
  p = jnp.where(i >= j, p, 0.0)
  sel = jax.lax.broadcasted_iota(jnp.int32, lam.shape, 1)
  d_res = jnp.zeros(lam.shape, F32)
  d_lam = jnp.zeros(lam.shape, F32)
  for n in range(lam.shape[1]):
    e = p * jnp.exp(column(lam, n)[None, None, :] * lag)
    r_n = jnp.sum(jnp.sum(e, axis=0), axis=0)
    l_n = jnp.sum(jnp.sum(e * lag, axis=0), axis=0) * column(res, n)
    d_res = d_res + jnp.where(sel == n, r_n[:, None], 0.0)
    d_lam = d_lam + jnp.where(sel == n, l_n[:, None], 0.0)
  return d_res, d_lam


def _adjoint_step(a_tab, res, g, row, a_k, rows_eff, w, wp, wg):
  """The adjoint-state update over one chunk (impulses g [c, tile]): returns (w, wp, wg) moved to
  the row before the chunk."""
  ag = jnp.sum(a_tab * g[:, :, None], axis=0)
  agp = jnp.sum(a_tab * ((row + 1).astype(F32) * g)[:, :, None], axis=0)
  wp = a_k * (wp + rows_eff * w) + res * agp
  return a_k * w + res * ag, wp, a_k * wg + ag


def _bwd_kernel(lam_ref, res_ref, skip_ref, s0_ref, win_ref, wpin_ref, wgin_ref, x1_ref, v_ref,
                x2_ref, z_ref, dy_ref, dx1_ref, dv_ref, dx2_ref, dlam_ref, dres_ref, dskip_ref,
                ds0_ref, *, geo: Geometry):
  bs = geo.bs
  c, tile = bs.chunk, bs.tile
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(ti * tile, tile)
  lam = lam_ref[cols, :]
  res = res_ref[cols, :]
  skip = skip_ref[cols][None, :]
  a_tab, b_tab, a_c = decay_tables(lam, c)
  toe = lag_table(lam, res, c)
  row = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)

  def load(k):
    rows = pl.ds(k * c, c)
    return tuple(r[b, rows, cols] for r in (x1_ref, v_ref, x2_ref, z_ref, dy_ref))

  def step(k, carry, loaded, b_k=b_tab, a_k=a_c, rows_eff=c):
    wg, w, wp, d_res, d_lam, d_skip, p = carry
    x1, v, x2, z, dy = loaded
    x1f, vf, dyf = x1.astype(F32), v.astype(F32), dy.astype(F32)
    u = (x1 * v).astype(F32)
    g = dyf * x2.astype(F32)
    rows = pl.ds(k * c, c)
    dx2_ref[b, rows, cols] = (dyf * z.astype(F32)).astype(dx2_ref.dtype)
    du = (jnp.sum(toe * g[:, None, :], axis=0)          # sum_{i>=j} h[i-j] g_i
          + jnp.sum(b_k * w[None], axis=2)              # the cotangent from later chunks
          + skip * g)
    dx1_ref[b, rows, cols] = (du * vf).astype(dx1_ref.dtype)
    dv_ref[b, rows, cols] = (du * x1f).astype(dv_ref.dtype)
    d_skip = d_skip + jnp.sum(g * u, axis=0)
    p = p + g[:, None, :] * u[None, :, :]
    delta = jnp.maximum(rows_eff - 1 - row, 0).astype(F32)
    bu = jnp.sum(b_k * u[:, :, None], axis=0)
    bdu = jnp.sum(b_k * (delta * u)[:, :, None], axis=0)
    d_res = d_res + bu * wg
    d_lam = d_lam + bu * wp + bdu * w
    w, wp, wg = _adjoint_step(a_tab, res, g, row, a_k, rows_eff, w, wp, wg)
    return wg, w, wp, d_res, d_lam, d_skip, p

  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1
  zeros = jnp.zeros(lam.shape, F32)
  carry = (wgin_ref[b, si, cols, :], win_ref[b, si, cols, :], wpin_ref[b, si, cols, :], zeros,
           zeros, jnp.zeros((tile,), F32), jnp.zeros((c, c, tile), F32))
  b_last, a_last, rows_last = segment_tail(lam, geo, si, b_tab, a_c)
  carry = step(last, carry, load(last), b_last, a_last, rows_last)
  carry, _ = walk(load, step, last - 1, geo.seg_chunks - 1, -1, carry, geo)
  wg, w, wp, d_res, d_lam, d_skip, p = carry
  # The initial state pairs with every impulse; only segment 0 holds it (later segments' incoming
  # states are earlier chunks' u, whose pairs their own segments count).
  s0 = jnp.where(si == 0, s0_ref[b, cols, :], 0.0)
  r_in, l_in = _intra_pairs(p, lam, res, c)
  dres_ref[b, si, cols, :] = d_res + r_in + s0 * wg
  dlam_ref[b, si, cols, :] = d_lam + l_in + s0 * wp
  ds0_ref[b, si, cols, :] = w
  dskip_ref[b, si, cols] = d_skip


def _adjoint_state_kernel(lam_ref, res_ref, x2_ref, dy_ref, ew_ref, ewp_ref, eg_ref, *,
                          geo: Geometry):
  """First backward pass of the segmented launch: each segment's (W, W', Wg) at the row before
  it, from the segment's own impulses alone."""
  c, tile = geo.bs.chunk, geo.bs.tile
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(ti * tile, tile)
  lam = lam_ref[cols, :]
  res = res_ref[cols, :]
  a_tab, b_tab, a_c = decay_tables(lam, c)
  row = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)

  def load(k):
    rows = pl.ds(k * c, c)
    return x2_ref[b, rows, cols], dy_ref[b, rows, cols]

  def step(k, carry, loaded, a_k=a_c, rows_eff=c):
    g = loaded[1].astype(F32) * loaded[0].astype(F32)
    return _adjoint_step(a_tab, res, g, row, a_k, rows_eff, *carry)

  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1
  zeros = jnp.zeros(lam.shape, F32)
  _, a_last, rows_last = segment_tail(lam, geo, si, b_tab, a_c)
  carry = step(last, (zeros, zeros, zeros), load(last), a_last, rows_last)
  (w, wp, wg), _ = walk(load, step, last - 1, geo.seg_chunks - 1, -1, carry, geo)
  ew_ref[b, si, cols, :] = w
  ewp_ref[b, si, cols, :] = wp
  eg_ref[b, si, cols, :] = wg


def segment_adjoints(geo: Geometry, lam, ends, ds_out):
  """Incoming (W, W', Wg) of every segment (from all later segments and the final-state
  cotangent) from the segments' own end values ``ends`` = (W, W', Wg), each [B, S, Dp, Np]:
  a reverse scan over S tiny states."""
  seg_len = np.full((geo.num_segments,), float(geo.segment_length), np.float32)
  seg_len[-1] -= geo.bs.chunk - geo.tail
  lengths = jnp.asarray(seg_len[1:])
  decays = jnp.exp(lam[None] * lengths[:, None, None])                  # [S-1, Dp, Np]

  def body(carry, xs):
    w, wp, wg = carry  # incoming values of segment k + 1
    ew, ewp, eg, decay, length = xs
    new = (decay * w + ew, decay * (wp + length * w) + ewp, decay * wg + eg)
    return new, new

  xs = tuple(jnp.moveaxis(e[:, 1:], 1, 0) for e in ends) + (decays, lengths)
  zeros = jnp.zeros_like(ds_out)
  _, ins = jax.lax.scan(body, (ds_out, zeros, zeros), xs, reverse=True)
  last = (ds_out, zeros, zeros)
  return tuple(jnp.concatenate([jnp.moveaxis(i, 0, 1), l[:, None]], axis=1)
               for i, l in zip(ins, last))


def bwd(x1, v, x2, log_poles, residues, dskip, state, z, dy, ds_out, bs: BlockSizes,
        interpret: bool = False, poison: bool = False):
  """Gradients (dx1, dv, dx2, dlog_poles, dresidues, ddskip, dstate) of ``modal_scan`` for the
  cotangents dy [B, L, D] and ds_out [B, D, N]; z [B, L, D] is the forward's residual."""
  geo = make_geometry(x1.shape, log_poles.shape, bs)
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  x1p, vp, x2p, zp, dyp = pad_inputs(geo, x1, v, x2, z, dy)
  s0 = pad_state(geo, state)
  dsT = pad_state(geo, ds_out)
  seg = jax.ShapeDtypeStruct((geo.batch, geo.num_segments) + s0.shape[1:], F32)
  if geo.num_segments == 1:
    zeros = jnp.zeros_like(dsT)[:, None]
    w_in, wp_in, wg_in = dsT[:, None], zeros, zeros
  else:
    ends = call_pallas(functools.partial(_adjoint_state_kernel, geo=geo), (seg, seg, seg),
                       geo.grid, geo.bs, interpret, "modal_scan_adjoints", poison, lam, res,
                       x2p, dyp)
    w_in, wp_in, wg_in = segment_adjoints(geo, lam, ends, dsT)
  big = jax.ShapeDtypeStruct(x1p.shape, x1.dtype)
  out_shape = (big, big, big, seg, seg,
               jax.ShapeDtypeStruct((geo.batch, geo.num_segments, geo.padded_channels), F32),
               seg)
  dx1, dv, dx2, dlam, dres, dskip_p, ds0 = call_pallas(
      functools.partial(_bwd_kernel, geo=geo), out_shape, geo.grid, geo.bs, interpret,
      "modal_scan_bwd", poison, lam, res, skip, s0, w_in, wp_in, wg_in, x1p, vp, x2p, zp, dyp)
  ln, d, n = geo.length, geo.channels, geo.states
  return (dx1[:, :ln, :d], dv[:, :ln, :d], dx2[:, :ln, :d], dlam.sum((0, 1))[:d, :n],
          dres.sum((0, 1))[:d, :n], dskip_p.sum((0, 1))[:d], ds0[:, 0, :d, :n])
