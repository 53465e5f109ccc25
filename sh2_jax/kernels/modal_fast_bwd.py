"""The backward pass of ``modal_fast`` (Pallas / Triton), two passes over the tokens.

With g = dy * x2 the cotangent of z, s_t = a s_{t-1} + u_t and z_t = sum_n R s_t + dskip u_t:

  * forward in time ("grads"), from each segment's incoming (s, m = p + s, p = ds/dlambda):
    recomputes s <- a s + u, z (dx2 = dy z, no saved residual) and m <- a m + s (p_t =
    a m_{t-1}, so p <- a (p + s) costs one multiply-add), summing dR += g s, ddskip += g u and
    dlambda = R a sum_t g_t m_{t-1} (+ ds_final p at t = L - 1). With ``fuse_adjoint`` it also
    sums the segment's own adjoint start state ew = R sum_t a^(t - t0 + 1) g_t (P <- a P), so the
    reverse pass needs no pass of its own over x2 and dy to find where each segment starts.
  * backward in time ("adjoint"): W <- a (R g + W) carries the cotangent of the state;
    du = sum_n (R g + W) + dskip g gives dx1 = du v, dv = du x1; W at the sequence start is ds0.

Segments are joined by ``modal_fast_layout.scan_adjoint`` (W entering each segment's end).
Every exponent is >= 0; tokens past L (the padded tail) leave every state unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sh2_jax.kernels._pallas import call_pallas
from sh2_jax.kernels.modal_fast_layout import (F32, FastBlocks, Geometry, decays, ids, keep,
                                               load_rows, make_geometry, pad_params, pad_state,
                                               scan_adjoint, store_rows, token_rows,
                                               unpad_state, walk)
from sh2_jax.kernels.modal_geometry import pad_inputs


def _gate(x1, v):
  return (x1 * v).astype(F32)


def _grads_kernel(lam_ref, res_ref, skip_ref, sin_ref, min_ref, dsT_ref, x1_ref, v_ref, x2_ref,
                  dy_ref, dx2_ref, dlam_ref, dres_ref, dskip_ref, *ew_ref, geo: Geometry):
  b, cols, si = ids(geo)
  n, c = geo.states, geo.bs.chunk
  a = decays(lam_ref, cols, n)
  r = load_rows(res_ref, (cols,), n)
  skip = skip_ref[cols]
  fuse = bool(ew_ref)
  horner = fuse and geo.bs.horner
  i_last = (geo.length - 1) % c  # t = L - 1 in the sequence's last chunk
  a_c = a
  for _ in range(c.bit_length() - 1):  # a^c by squaring (c is a power of two)
    a_c = tuple(x * x for x in a_c)

  # No masks: tokens past L have u = g = dy = 0, so they add nothing to any sum, and the states
  # this pass ends with are not kept (p at t = L - 1 is taken on the way, at i_last).
  def step(k, carry, cur, masked):
    s, m, d_res, d_lam, d_skip, e, pw = carry
    p_end = None
    gs = []
    for i, (x1, v, x2, dy) in enumerate(cur):
      t = k * c + i
      u = _gate(x1, v)
      dyf = dy.astype(F32)
      g = dyf * x2.astype(F32)
      gs.append(g)
      d_lam = tuple(dk + g * mk for dk, mk in zip(d_lam, m))    # g_t m_{t-1} = g_t p_t / a
      if masked and i == i_last:
        p_end = tuple(ak * mk for ak, mk in zip(a, m))
      s = tuple(ak * sk + u for ak, sk in zip(a, s))
      m = tuple(ak * mk + sk for ak, mk, sk in zip(a, m, s))
      z = skip * u
      for rk, sk in zip(r, s):
        z = z + rk * sk
      dx2_ref[b, t, cols] = (dyf * z).astype(dx2_ref.dtype)
      d_res = tuple(dk + g * sk for dk, sk in zip(d_res, s))
      d_skip = d_skip + g * u
      if fuse and not horner:  # e += a^(tau + 1) g, pw = a^(tau + 1)
        e = tuple(ek + pk * g for ek, pk in zip(e, pw))
        pw = tuple(pk * ak for pk, ak in zip(pw, a))
    if horner:  # e += a^(tau0 + 1) sum_i a^i g_i, pw = a^(tau0 + 1) for the chunk at tau0
      h = tuple(gs[-1] for _ in range(n))
      for gi in gs[-2::-1]:
        h = tuple(ak * hk + gi for ak, hk in zip(a, h))
      e = tuple(ek + pk * hk for ek, pk, hk in zip(e, pw, h))
      pw = tuple(pk * ak for pk, ak in zip(pw, a_c))
    carry = s, m, d_res, d_lam, d_skip, e, pw
    return (carry, p_end) if masked else carry

  zeros = tuple(jnp.zeros((geo.bs.tile,), F32) for _ in range(n))
  carry = (load_rows(sin_ref, (b, si, cols), n), load_rows(min_ref, (b, si, cols), n), zeros,
           zeros, jnp.zeros((geo.bs.tile,), F32), zeros if fuse else (), a if fuse else ())
  loads = token_rows(geo, (x1_ref, v_ref, x2_ref, dy_ref), b, cols)
  (_, _, d_res, d_lam, d_skip, e, _), p_end = walk(geo, si, loads, step, carry, split_last=True)
  # the final-state cotangent meets p at t = L - 1: only the last segment ends there
  last = si == geo.num_segments - 1
  ds_end = load_rows(dsT_ref, (b, cols), n)
  store_rows(dres_ref, (b, si, cols), d_res)
  store_rows(dlam_ref, (b, si, cols),
             tuple(rk * ak * dk + jnp.where(last, ek, 0.0) * pk
                   for rk, ak, dk, ek, pk in zip(r, a, d_lam, ds_end, p_end)))
  dskip_ref[b, si, cols] = d_skip
  if fuse:
    @pl.when(si > 0)  # segment 0's start state is never needed: ew holds segments 1..S-1
    def _():
      store_rows(ew_ref[0], (b, si - 1, cols), tuple(rk * ek for rk, ek in zip(r, e)))


def _adjoint_ends_kernel(lam_ref, res_ref, x2_ref, dy_ref, ew_ref, *, geo: Geometry):
  """Segment si + 1's own adjoint start state, W <- a (R g + W) from zero in reverse (the
  unfused form of ``_grads_kernel``'s ew)."""
  b, cols, si = ids(geo)
  n, c = geo.states, geo.bs.chunk
  a = decays(lam_ref, cols, n)
  r = load_rows(res_ref, (cols,), n)

  def step(k, w, cur, masked):  # tokens past L have g = 0 and W starts at 0: no mask needed
    for i in range(c - 1, -1, -1):
      x2, dy = cur[i]
      g = dy.astype(F32) * x2.astype(F32)
      w = tuple(ak * (rk * g + wk) for ak, rk, wk in zip(a, r, w))
    return w

  zeros = tuple(jnp.zeros((geo.bs.tile,), F32) for _ in range(n))
  w = walk(geo, si + 1, token_rows(geo, (x2_ref, dy_ref), b, cols), step, zeros, reverse=True)
  store_rows(ew_ref, (b, si, cols), w)


def _adjoint_kernel(lam_ref, res_ref, skip_ref, win_ref, x1_ref, v_ref, x2_ref, dy_ref, dx1_ref,
                    dv_ref, ds0_ref, *, geo: Geometry):
  b, cols, si = ids(geo)
  n, c = geo.states, geo.bs.chunk
  a = decays(lam_ref, cols, n)
  r = load_rows(res_ref, (cols,), n)
  skip = skip_ref[cols]

  def step(k, w, cur, masked):
    for i in range(c - 1, -1, -1):
      x1, v, x2, dy = cur[i]
      t = k * c + i
      g = dy.astype(F32) * x2.astype(F32)
      q = tuple(rk * g + wk for rk, wk in zip(r, w))       # cotangent of s_t
      du = skip * g
      for qk in q:
        du = du + qk
      dx1_ref[b, t, cols] = (du * v.astype(F32)).astype(dx1_ref.dtype)
      dv_ref[b, t, cols] = (du * x1.astype(F32)).astype(dv_ref.dtype)
      w = keep(masked, t < geo.length, tuple(ak * qk for ak, qk in zip(a, q)), w)
    return w

  w = walk(geo, si, token_rows(geo, (x1_ref, v_ref, x2_ref, dy_ref), b, cols), step,
           load_rows(win_ref, (b, si, cols), n), reverse=True)

  @pl.when(si == 0)
  def _():
    store_rows(ds0_ref, (b, cols), w)


def _shapes(geo: Geometry, x):
  rows = (geo.states, geo.padded_channels)
  return (jax.ShapeDtypeStruct(x.shape, x.dtype),
          jax.ShapeDtypeStruct((geo.batch, geo.num_segments) + rows, F32),
          jax.ShapeDtypeStruct((geo.batch, geo.num_segments - 1) + rows, F32),
          jax.ShapeDtypeStruct((geo.batch,) + rows, F32))


def launch_grads(geo: Geometry, lam, res, skip, s_in, m_in, dsT, x1, v, x2, dy, fuse: bool,
                 interpret=False, poison=False):
  """The forward-in-time pass: (dx2, dlambda, dR per segment [B, S, N, Dp], ddskip per segment
  [B, S, Dp][, ew [B, S-1, N, Dp] with ``fuse``]) from the padded arrays."""
  big, segs, ends, _ = _shapes(geo, x1)
  out_shape = (big, segs, segs, jax.ShapeDtypeStruct(segs.shape[:2] + segs.shape[3:], F32))
  return call_pallas(functools.partial(_grads_kernel, geo=geo),
                     out_shape + ((ends,) if fuse else ()), geo.grid, geo.bs, interpret,
                     "modal_fast_grads", poison, lam, res, skip, s_in, m_in, dsT, x1, v, x2, dy)


def launch_adjoint_ends(geo: Geometry, lam, res, x2, dy, interpret=False, poison=False):
  """The unfused backward's extra pass: ew [B, S-1, N, Dp] (segments 1..S-1)."""
  return call_pallas(functools.partial(_adjoint_ends_kernel, geo=geo), (_shapes(geo, x2)[2],),
                     (geo.batch, geo.padded_channels // geo.bs.tile, geo.num_segments - 1),
                     geo.bs, interpret, "modal_fast_adjoint_ends", poison, lam, res, x2, dy)[0]


def launch_adjoint(geo: Geometry, lam, res, skip, w_in, x1, v, x2, dy, interpret=False,
                   poison=False):
  """The backward-in-time pass: (dx1, dv, ds0 rows [B, N, Dp]) from W entering every
  segment's end, w_in [B, S, N, Dp]."""
  big, _, _, state = _shapes(geo, x1)
  return call_pallas(functools.partial(_adjoint_kernel, geo=geo), (big, big, state), geo.grid,
                     geo.bs, interpret, "modal_fast_adjoint", poison, lam, res, skip, w_in, x1, v,
                     x2, dy)


def _match_channels(geo: Geometry, rows):
  """Segment-state rows from a forward launch with another tile: re-pad the channel axis."""
  if rows.shape[-1] == geo.padded_channels:
    return rows
  rows = rows[..., :geo.channels]
  return jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, geo.padded_channels - geo.channels)])


def bwd(x1, v, x2, log_poles, residues, dskip, seg_states, dy, ds_out, bs: FastBlocks,
        interpret: bool = False, poison: bool = False):
  """(dx1, dv, dx2, dlog_poles [D, N], dresidues [D, N], ddskip [D], dstate [B, D, N]) from the
  forward's segment states (s_in, m_in) [B, S, N, Dp]; runs on ``bs.backward()``."""
  geo = make_geometry(x1.shape, log_poles.shape, bs.backward())
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  x1p, vp, x2p, dyp = pad_inputs(geo, x1, v, x2, dy)
  dsT = pad_state(geo, ds_out)
  s_in, m_in = (_match_channels(geo, r) for r in seg_states)
  fuse = bs.fuse_adjoint and geo.num_segments > 1
  outs = launch_grads(geo, lam, res, skip, s_in, m_in, dsT, x1p, vp, x2p, dyp, fuse, interpret,
                      poison)
  dx2, dlam, dres, dskip_p = outs[:4]
  if geo.num_segments == 1:
    w_in = dsT[:, None]
  else:
    ew = outs[4] if fuse else launch_adjoint_ends(geo, lam, res, x2p, dyp, interpret, poison)
    w_in = scan_adjoint(geo, lam, dsT, ew, interpret, poison)
  dx1, dv, ds0 = launch_adjoint(geo, lam, res, skip, w_in, x1p, vp, x2p, dyp, interpret, poison)
  ln, d = geo.length, geo.channels
  return (dx1[:, :ln, :d], dv[:, :ln, :d], dx2[:, :ln, :d], unpad_state(geo, dlam.sum((0, 1))),
          unpad_state(geo, dres.sum((0, 1))), dskip_p.sum((0, 1))[:d], unpad_state(geo, ds0))
