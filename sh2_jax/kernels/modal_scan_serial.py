"""The LI core as a token-serial recurrence: each lane owns channels and steps their N states
token by token (Pallas / Triton). Same contract as ``modal_scan.modal_scan``.

Why a second form: the chunked kernel (``modal_scan.py``) spends ~48 multiply-adds per token and
channel in [c, tile, N] broadcast-and-reduce contractions and measured ~8x over the memory floor
on an H100. Stepping the recurrence itself costs 32 (``s = a s + u``, ``z = sum_n R s``), all
elementwise on a [N, tile] register tensor whose reduction over N stays inside a lane when the
channels lie along the lanes. Long sequences are cut into segments run in parallel and joined by
the same scan of segment states as the chunked kernel.

Backward without the chunked pair sums:
  * reverse pass ("adjoint"): W <- a (R g + W) carries the cotangent of the state; du = sum_n
    (R g + W) + dskip g gives dx1, dv; W at the sequence start is ds0.
  * forward pass ("grads"): recomputes s, z (dx2 = dy z, no saved residual) and p = ds/dlambda by
    p <- a (p + s) (every exponent >= 0), summing dR += g s, dlambda += R g p (+ ds_final p_end),
    ddskip += g u.
Tokens past L (the padded tail) leave every state unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sh2_jax.kernels._pallas import call_pallas
from sh2_jax.kernels.modal_geometry import (F32, BlockSizes, Geometry, check_inputs,
                                            make_geometry, pad_inputs, pad_params, pad_state)

# Tokens per unrolled block ("chunk"), channels per program, 1 warp: 32 lanes x 1 channel each.
DEFAULT = BlockSizes(chunk=8, tile=32, segment_chunks=32, num_warps=1)


def _ids():
  return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _walk(geo: Geometry, si, token, carry, reverse: bool = False):
  """carry = token(t, carry, masked) over the tokens of segment si: unrolled blocks of c tokens
  in a fori_loop; the segment's last block is masked (t < L) because it may hold the tail."""
  c = geo.bs.chunk
  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1

  def block(k, carry, masked):
    order = range(c - 1, -1, -1) if reverse else range(c)
    for i in order:
      carry = token(k * c + i, carry, masked)
    return carry

  n = geo.seg_chunks - 1
  if reverse:
    carry = block(last, carry, True)
    return jax.lax.fori_loop(0, n, lambda j, cr: block(last - 1 - j, cr, False), carry)
  carry = jax.lax.fori_loop(0, n, lambda j, cr: block(first + j, cr, False), carry)
  return block(last, carry, True)


def _keep(geo, t, masked, new, old):
  return jnp.where(t < geo.length, new, old) if masked else new


def _load_nt(ref, idx, rows_io: bool):
  """``ref[idx + (all states,)]`` ([tile, N] in memory) as a float32 [N, tile] register tensor.

  With ``rows_io`` (compiled kernels) it is N row loads: that keeps every [N, tile] tensor in
  Triton's default layout for the shape — each lane holds whole columns, so sums over N stay in
  the lane and the per-token [tile] rows need no layout conversion (checked in the TTGIR / SASS:
  no shuffles, no barriers), whereas a 2D load would impose its coalesced layout on the
  loop-carried states. The interpreter (tests) takes the one 2D load: far fewer ops to trace."""
  if not rows_io:
    return ref[idx + (slice(None),)].astype(F32).T
  states = ref.shape[-1]
  rows = [ref[idx + (n,)].astype(F32) for n in range(states)]
  sel = jax.lax.broadcasted_iota(jnp.int32, (states, rows[0].shape[0]), 0)
  out = jnp.zeros(sel.shape, F32)
  for n, r in enumerate(rows):
    out = jnp.where(sel == n, r[None, :], out)
  return out


def _store_nt(ref, idx, x, rows_io: bool):
  """The inverse of ``_load_nt``: ``ref[idx + (all states,)] = x.T``."""
  if not rows_io:
    ref[idx + (slice(None),)] = x.T
    return
  sel = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
  for n in range(x.shape[0]):
    ref[idx + (n,)] = jnp.sum(jnp.where(sel == n, x, 0.0), axis=0)


def _params(lam_ref, res_ref, cols, rows_io):
  return (jnp.exp(_load_nt(lam_ref, (cols,), rows_io)),       # a [N, tile]
          _load_nt(res_ref, (cols,), rows_io))


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(lam_ref, res_ref, skip_ref, sin_ref, x1_ref, v_ref, x2_ref, y_ref, sT_ref, *,
                geo: Geometry, rows_io: bool):
  b, ti, si = _ids()
  cols = pl.ds(ti * geo.bs.tile, geo.bs.tile)
  a, res = _params(lam_ref, res_ref, cols, rows_io)
  skip = skip_ref[cols]

  def token(t, s, masked):
    x1, v = x1_ref[b, t, cols], v_ref[b, t, cols]
    u = (x1 * v).astype(F32)
    s = _keep(geo, t, masked, a * s + u[None, :], s)
    z = jnp.sum(res * s, axis=0) + skip * u
    y_ref[b, t, cols] = (x2_ref[b, t, cols].astype(F32) * z).astype(y_ref.dtype)
    return s

  s = _walk(geo, si, token, _load_nt(sin_ref, (b, si, cols), rows_io))
  _store_nt(sT_ref, (b, si, cols), s, rows_io)


def _state_kernel(lam_ref, x1_ref, v_ref, e_ref, ep_ref, *, geo: Geometry, rows_io: bool):
  """Each segment's end state and its lambda-derivative, from zero."""
  b, ti, si = _ids()
  cols = pl.ds(ti * geo.bs.tile, geo.bs.tile)
  a, _ = _params(lam_ref, lam_ref, cols, rows_io)

  def token(t, carry, masked):
    s, p = carry
    u = (x1_ref[b, t, cols] * v_ref[b, t, cols]).astype(F32)
    return (_keep(geo, t, masked, a * s + u[None, :], s),
            _keep(geo, t, masked, a * (p + s), p))

  zeros = jnp.zeros(a.shape, F32)
  s, p = _walk(geo, si, token, (zeros, zeros))
  _store_nt(e_ref, (b, si, cols), s, rows_io)
  _store_nt(ep_ref, (b, si, cols), p, rows_io)


def _adjoint_state_kernel(lam_ref, res_ref, x2_ref, dy_ref, ew_ref, *, geo: Geometry,
                          rows_io: bool):
  """Each segment's W (cotangent of the state before it) from its own impulses alone."""
  b, ti, si = _ids()
  cols = pl.ds(ti * geo.bs.tile, geo.bs.tile)
  a, res = _params(lam_ref, res_ref, cols, rows_io)

  def token(t, w, masked):
    g = dy_ref[b, t, cols].astype(F32) * x2_ref[b, t, cols].astype(F32)
    return _keep(geo, t, masked, a * (res * g[None, :] + w), w)

  w = _walk(geo, si, token, jnp.zeros(a.shape, F32), reverse=True)
  _store_nt(ew_ref, (b, si, cols), w, rows_io)


def _adjoint_kernel(lam_ref, res_ref, skip_ref, win_ref, x1_ref, v_ref, x2_ref, dy_ref, dx1_ref,
                    dv_ref, ds0_ref, *, geo: Geometry, rows_io: bool):
  b, ti, si = _ids()
  cols = pl.ds(ti * geo.bs.tile, geo.bs.tile)
  a, res = _params(lam_ref, res_ref, cols, rows_io)
  skip = skip_ref[cols]

  def token(t, w, masked):
    x1, v = x1_ref[b, t, cols].astype(F32), v_ref[b, t, cols].astype(F32)
    g = dy_ref[b, t, cols].astype(F32) * x2_ref[b, t, cols].astype(F32)
    q = res * g[None, :] + w                                    # cotangent of s_t
    du = jnp.sum(q, axis=0) + skip * g
    dx1_ref[b, t, cols] = (du * v).astype(dx1_ref.dtype)
    dv_ref[b, t, cols] = (du * x1).astype(dv_ref.dtype)
    return _keep(geo, t, masked, a * q, w)

  w = _walk(geo, si, token, _load_nt(win_ref, (b, si, cols), rows_io), reverse=True)
  _store_nt(ds0_ref, (b, si, cols), w, rows_io)


def _grads_kernel(lam_ref, res_ref, skip_ref, sin_ref, pin_ref, dsT_ref, x1_ref, v_ref, x2_ref,
                  dy_ref, dx2_ref, dlam_ref, dres_ref, dskip_ref, *, geo: Geometry,
                  rows_io: bool):
  b, ti, si = _ids()
  cols = pl.ds(ti * geo.bs.tile, geo.bs.tile)
  a, res = _params(lam_ref, res_ref, cols, rows_io)
  skip = skip_ref[cols]

  def token(t, carry, masked):
    s, p, d_res, d_lam, d_skip = carry
    x1, v = x1_ref[b, t, cols], v_ref[b, t, cols]
    dy = dy_ref[b, t, cols].astype(F32)
    u = (x1 * v).astype(F32)
    g = dy * x2_ref[b, t, cols].astype(F32)
    p = _keep(geo, t, masked, a * (p + s), p)                   # d s_t / d lambda
    s = _keep(geo, t, masked, a * s + u[None, :], s)
    z = jnp.sum(res * s, axis=0) + skip * u
    dx2_ref[b, t, cols] = (dy * z).astype(dx2_ref.dtype)
    return s, p, d_res + g[None, :] * s, d_lam + g[None, :] * p, d_skip + g * u

  zeros = jnp.zeros(a.shape, F32)
  carry = (_load_nt(sin_ref, (b, si, cols), rows_io), _load_nt(pin_ref, (b, si, cols), rows_io),
           zeros, zeros,
           jnp.zeros((geo.bs.tile,), F32))
  s, p, d_res, d_lam, d_skip = _walk(geo, si, token, carry)
  # the final-state cotangent meets p at t = L - 1: only the last segment ends there
  ds_end = _load_nt(dsT_ref, (b, cols), rows_io)
  ds_end = jnp.where(si == geo.num_segments - 1, ds_end, 0.0)
  _store_nt(dres_ref, (b, si, cols), d_res, rows_io)
  _store_nt(dlam_ref, (b, si, cols), res * d_lam + ds_end * p, rows_io)
  dskip_ref[b, si, cols] = d_skip


# ----------------------------------------------------------------------------- launches


def _segment_lengths(geo: Geometry) -> np.ndarray:
  lengths = np.full((geo.num_segments,), float(geo.segment_length), np.float32)
  lengths[-1] = geo.length - (geo.num_segments - 1) * geo.segment_length
  return lengths


def incoming(geo: Geometry, lam, ends, dends, s0):
  """(s_in, p_in) of every segment from the from-zero ends (s, ds/dlambda) [B, S, Dp, Np]."""
  length = float(geo.segment_length)
  decay = jnp.exp(lam * length)

  def body(carry, xs):
    s, p = carry
    e, ep = xs
    return (decay * s + e, decay * (p + length * s) + ep), (s, p)

  _, (s_in, p_in) = jax.lax.scan(body, (s0, jnp.zeros_like(s0)),
                                 (jnp.moveaxis(ends, 1, 0), jnp.moveaxis(dends, 1, 0)))
  return jnp.moveaxis(s_in, 0, 1), jnp.moveaxis(p_in, 0, 1)


def incoming_adjoint(geo: Geometry, lam, ends, ds_out):
  """W entering every segment from the later ones and the final-state cotangent (reverse scan)."""
  lengths = jnp.asarray(_segment_lengths(geo)[1:])
  decays = jnp.exp(lam[None] * lengths[:, None, None])

  def body(w, xs):
    ew, decay = xs
    w = decay * w + ew
    return w, w

  _, w_in = jax.lax.scan(body, ds_out, (jnp.moveaxis(ends[:, 1:], 1, 0), decays), reverse=True)
  return jnp.concatenate([jnp.moveaxis(w_in, 0, 1), ds_out[:, None]], axis=1)


def _launch(kernel, out_shape, geo, opts, name, *args):
  """One pallas_call of a token-serial kernel; opts = (interpret, poison, rows_io)."""
  interpret, poison, rows_io = opts
  return call_pallas(functools.partial(kernel, geo=geo, rows_io=rows_io), out_shape, geo.grid,
                     geo.bs, interpret, name, poison, *args)


def fwd(x1, v, x2, log_poles, residues, dskip, state, bs, opts):
  """(y, final_state, (s_in, p_in) per segment); opts = (interpret, poison, rows_io)."""
  geo = make_geometry(x1.shape, log_poles.shape, bs)
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  xs = pad_inputs(geo, x1, v, x2)
  s0 = pad_state(geo, state)
  seg = jax.ShapeDtypeStruct((geo.batch, geo.num_segments) + s0.shape[1:], F32)
  if geo.num_segments == 1:
    s_in, p_in = s0[:, None], jnp.zeros_like(s0)[:, None]
  else:
    ends, dends = _launch(_state_kernel, (seg, seg), geo, opts, "modal_serial_states", lam,
                          *xs[:2])
    s_in, p_in = incoming(geo, lam, ends, dends, s0)
  y, s_out = _launch(_fwd_kernel, (jax.ShapeDtypeStruct(xs[0].shape, x1.dtype), seg), geo, opts,
                     "modal_serial_fwd", lam, res, skip, s_in, *xs)
  return (y[:, :geo.length, :geo.channels], s_out[:, -1, :geo.channels, :geo.states],
          (s_in, p_in))


def bwd(x1, v, x2, log_poles, residues, dskip, seg_states, dy, ds_out, bs, opts):
  """(dx1, dv, dx2, dlog_poles, dresidues, ddskip, dstate)."""
  geo = make_geometry(x1.shape, log_poles.shape, bs)
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  x1p, vp, x2p, dyp = pad_inputs(geo, x1, v, x2, dy)
  dsT = pad_state(geo, ds_out)
  s_in, p_in = seg_states
  seg = jax.ShapeDtypeStruct(s_in.shape, F32)
  if geo.num_segments == 1:
    w_in = dsT[:, None]
  else:
    (ends,) = _launch(_adjoint_state_kernel, (seg,), geo, opts, "modal_serial_adjoint_states",
                      lam, res, x2p, dyp)
    w_in = incoming_adjoint(geo, lam, ends, dsT)
  big = jax.ShapeDtypeStruct(x1p.shape, x1.dtype)
  dx1, dv, ds0 = _launch(_adjoint_kernel, (big, big, seg), geo, opts, "modal_serial_adjoint",
                         lam, res, skip, w_in, x1p, vp, x2p, dyp)
  skip_shape = jax.ShapeDtypeStruct((geo.batch, geo.num_segments, geo.padded_channels), F32)
  dx2, dlam, dres, dskip_p = _launch(_grads_kernel, (big, seg, seg, skip_shape), geo, opts,
                                     "modal_serial_grads", lam, res, skip, s_in, p_in, dsT, x1p,
                                     vp, x2p, dyp)
  ln, d, n = geo.length, geo.channels, geo.states
  return (dx1[:, :ln, :d], dv[:, :ln, :d], dx2[:, :ln, :d], dlam.sum((0, 1))[:d, :n],
          dres.sum((0, 1))[:d, :n], dskip_p.sum((0, 1))[:d], ds0[:, 0, :d, :n])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _serial(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs, has_skip, launch = opts
  return fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state, bs, launch)[:2]


def _serial_fwd(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs, has_skip, launch = opts
  y, s_out, seg_states = fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state,
                             bs, launch)
  return (y, s_out), (x1, v, x2, log_poles, residues, dskip, state, seg_states)


def _serial_bwd(opts, saved, cts):
  bs, has_skip, launch = opts
  x1, v, x2, log_poles, residues, dskip, state, seg_states = saved
  dy, ds_out = cts
  dx1, dv, dx2, dlam, dres, ddskip, dstate = bwd(
      x1, v, x2, log_poles, residues, dskip if has_skip else None, seg_states, dy, ds_out, bs,
      launch)
  return (dx1, dv, dx2, dlam.astype(log_poles.dtype), dres.astype(residues.dtype),
          ddskip.astype(dskip.dtype), dstate.astype(state.dtype))


_serial.defvjp(_serial_fwd, _serial_bwd)


def modal_scan_serial(x1, v, x2, log_poles, residues, dskip=None, initial_state=None, *,
                      interpret: bool = False, block_sizes: BlockSizes | None = None,
                      poison: bool = False, rows_io: bool | None = None):
  """``(y, final_state)`` exactly as ``modal_scan.modal_scan`` (same shapes, dtypes, checks),
  by the token-serial kernels; block_sizes.chunk is the unrolled block of tokens. ``rows_io``
  (default: compiled only) moves the [tile, N] states per state row (see ``_load_nt``)."""
  check_inputs(x1, v, x2, log_poles, residues, dskip, initial_state)
  launch = (interpret, poison, (not interpret) if rows_io is None else rows_io)
  opts = (block_sizes or DEFAULT, dskip is not None, launch)
  d = jnp.zeros((x1.shape[2],), F32) if dskip is None else dskip
  s0 = (jnp.zeros((x1.shape[0], x1.shape[2], log_poles.shape[1]), F32)
        if initial_state is None else initial_state)
  return _serial(x1, v, x2, log_poles, residues, d, s0, opts)
