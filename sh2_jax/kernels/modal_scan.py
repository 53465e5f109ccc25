"""FFT-free Hyena-LI: the gated modal convolution as a chunked recurrence (Pallas / Triton).

    y = x2 * (h * u + dskip * u),   u = x1 * v,   h[d, t] = sum_n R[d, n] exp(lambda[d, n] t)

x1, v, x2: [B, L, D] (bf16 or f32); log_poles lambda and residues R: [D, N] float32 (lambda < 0);
dskip: [D] or None; initial state s0: [B, D, N] float32 or None. Returns y [B, L, D] in the input
dtype and the final state [B, D, N] float32 — the state of ``ops.modal.modal_step`` after the last
token, ``s_n = exp(lambda_n) s_n + u``, so a prefill hands its state straight to decoding.

Why no FFT: h is a sum of N decaying exponentials, so ``h * u`` is a diagonal linear recurrence
with N float32 states per channel. Cut L into chunks of c tokens (t = t0 + i). Inside a chunk

    z[i] = sum_{j<=i} h[i-j] u[j]                      (intra: a c x c Toeplitz per channel)
         + sum_n R_n a_n^(i+1) s_n                     (inter: the state at t0 - 1, a = exp(lambda))
    s_n  <- a_n^c s_n + sum_j a_n^(c-1-j) u[j]         (state pass to the next chunk)

A program owns one batch row and a tile of channels and walks all chunks in order, carrying the
[tile, N] state in registers; the Toeplitz [c, c, tile] and the two decay tables
A[i] = a^(i+1), B[j] = a^(c-1-j) ([c, tile, N]) are built once per program. Every exponent is
>= 0, so poles near 1 and fast poles are equally safe. The last chunk may be partial (any L): its
rows past L are zero padding and its state update uses a^(r-1-j) for its r real rows.

The backward pass (``modal_scan_bwd.py``) runs the adjoint recurrence backward in time with the
same tables (``modal_geometry.py``: the tiling and the pieces both directions share);
``modal_scan`` ties both together through ``jax.custom_vjp``. docs/architecture.md, "The modal
recurrence", states the identities.

Speed (H100, D = 4096, B = 1, bf16, L = 16K): 1.56 ms forward, 3.9 ms forward+backward — 2.7x and
3.0x the FFT path but ~8x the memory floor; the [c, tile, N] contractions, not the bytes, bound
it. ``modal_scan_serial.py`` steps the recurrence token by token instead (same contract).
"""


from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sh2_jax.kernels import modal_scan_bwd
from sh2_jax.kernels._pallas import call_pallas
from sh2_jax.kernels.modal_geometry import (DEFAULT_BWD, DEFAULT_FWD, F32, BlockSizes, Geometry,
                                            check_inputs, decay_tables, lag_table, make_geometry,
                                            pad_inputs, pad_params, pad_state, segment_tail, walk)
from sh2_jax.ops import fir, modal

__all__ = ["BlockSizes", "gated_modal_scan", "modal_scan", "modal_scan_reference"]


# ----------------------------------------------------------------------------- forward kernels


def _fwd_kernel(lam_ref, res_ref, skip_ref, sin_ref, x1_ref, v_ref, x2_ref, y_ref, sT_ref,
                *z_ref, geo: Geometry):
  bs = geo.bs
  c, tile = bs.chunk, bs.tile
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(ti * tile, tile)
  lam = lam_ref[cols, :]
  res = res_ref[cols, :]
  skip = skip_ref[cols][None, :]
  a_tab, b_tab, a_c = decay_tables(lam, c)
  toe = lag_table(lam, res, c)

  def load(k):
    rows = pl.ds(k * c, c)
    return x1_ref[b, rows, cols], v_ref[b, rows, cols], x2_ref[b, rows, cols]

  def step(k, s, loaded, b_k=b_tab, a_k=a_c):
    x1, v, x2 = loaded
    u = (x1 * v).astype(F32)                                         # [c, tile]
    z = (jnp.sum(toe * u[None, :, :], axis=1)                        # intra-chunk Toeplitz
         + jnp.sum(a_tab * (res * s)[None], axis=2)                  # the carried state
         + skip * u)
    rows = pl.ds(k * c, c)
    y_ref[b, rows, cols] = (x2.astype(F32) * z).astype(y_ref.dtype)
    if z_ref:
      z_ref[0][b, rows, cols] = z.astype(z_ref[0].dtype)
    return a_k * s + jnp.sum(b_k * u[:, :, None], axis=0)

  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1
  s, cur = walk(load, step, first, geo.seg_chunks - 1, 1, sin_ref[b, si, cols, :], geo)
  b_last, a_last, _ = segment_tail(lam, geo, si, b_tab, a_c)
  sT_ref[b, si, cols, :] = step(last, s, load(last) if cur is None else cur, b_last, a_last)


def _state_kernel(lam_ref, x1_ref, v_ref, e_ref, *, geo: Geometry):
  """First pass of the segmented launch: each segment's end state from a zero state."""
  c, tile = geo.bs.chunk, geo.bs.tile
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(ti * tile, tile)
  lam = lam_ref[cols, :]
  _, b_tab, a_c = decay_tables(lam, c)

  def load(k):
    rows = pl.ds(k * c, c)
    return x1_ref[b, rows, cols], v_ref[b, rows, cols]

  def step(k, s, loaded, b_k=b_tab, a_k=a_c):
    u = (loaded[0] * loaded[1]).astype(F32)
    return a_k * s + jnp.sum(b_k * u[:, :, None], axis=0)

  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1
  s, cur = walk(load, step, first, geo.seg_chunks - 1, 1, jnp.zeros(lam.shape, F32), geo)
  b_last, a_last, _ = segment_tail(lam, geo, si, b_tab, a_c)
  e_ref[b, si, cols, :] = step(last, s, load(last) if cur is None else cur, b_last, a_last)


def segment_states(geo: Geometry, lam, end_states, s0):
  """Incoming state of every segment from the from-zero end states [B, S, Dp, Np]
  (``ops.modal.segment_states``: s_in[0] = s0, s_in[k+1] = a^Ls s_in[k] + e[k])."""
  s_in = modal.segment_states(jnp.moveaxis(end_states, 1, 0), lam, float(geo.segment_length),
                              s0)
  return jnp.moveaxis(s_in, 0, 1)


def fwd(x1, v, x2, log_poles, residues, dskip, state, bs: BlockSizes, interpret: bool = False,
        poison: bool = False, save_z: bool = False):
  """The forward launch(es). Returns (y, final_state[, z]); z = h*u + dskip*u is the
  backward's residual for dx2."""
  geo = make_geometry(x1.shape, log_poles.shape, bs)
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  xs = pad_inputs(geo, x1, v, x2)
  s0 = pad_state(geo, state)
  seg_shape = jax.ShapeDtypeStruct((geo.batch, geo.num_segments) + s0.shape[1:], F32)
  if geo.num_segments == 1:
    s_in = s0[:, None]
  else:
    (ends,) = call_pallas(functools.partial(_state_kernel, geo=geo), (seg_shape,), geo.grid,
                          geo.bs, interpret, "modal_scan_states", poison, lam, *xs[:2])
    s_in = segment_states(geo, lam, ends, s0)
  shape = xs[0].shape
  out_shape = [jax.ShapeDtypeStruct(shape, x1.dtype), seg_shape]
  if save_z:
    out_shape.append(jax.ShapeDtypeStruct(shape, x1.dtype))
  outs = call_pallas(functools.partial(_fwd_kernel, geo=geo), tuple(out_shape), geo.grid,
                     geo.bs, interpret, "modal_scan_fwd", poison, lam, res, skip, s_in, *xs)
  y = outs[0][:, :geo.length, :geo.channels]
  s_out = outs[1][:, -1, :geo.channels, :geo.states]
  if save_z:
    return y, s_out, outs[2][:, :geo.length, :geo.channels]
  return y, s_out


# ----------------------------------------------------------------------------- public op


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _modal_scan(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs_fwd, _, has_skip, interpret, poison = opts
  return fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state, bs_fwd,
             interpret, poison)


def _modal_scan_fwd(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs_fwd, _, has_skip, interpret, poison = opts
  y, s_out, z = fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state,
                    bs_fwd, interpret, poison, save_z=True)
  return (y, s_out), (x1, v, x2, log_poles, residues, dskip, state, z)


def _modal_scan_bwd(opts, res, cts):
  _, bs_bwd, has_skip, interpret, poison = opts
  x1, v, x2, log_poles, residues, dskip, state, z = res
  dy, ds_out = cts
  dx1, dv, dx2, dlam, dres, ddskip, dstate = modal_scan_bwd.bwd(
      x1, v, x2, log_poles, residues, dskip if has_skip else None, state, z, dy, ds_out, bs_bwd,
      interpret, poison)
  return (dx1, dv, dx2, dlam.astype(log_poles.dtype), dres.astype(residues.dtype),
          ddskip.astype(dskip.dtype), dstate.astype(state.dtype))


_modal_scan.defvjp(_modal_scan_fwd, _modal_scan_bwd)


def modal_scan(x1: jax.Array, v: jax.Array, x2: jax.Array, log_poles: jax.Array,
               residues: jax.Array, dskip: jax.Array | None = None,
               initial_state: jax.Array | None = None, *, interpret: bool = False,
               block_sizes: BlockSizes | None = None, bwd_block_sizes: BlockSizes | None = None,
               poison: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(x2 * (h_modal * (x1 * v) + dskip * x1 * v), final_state)`` without FFTs.

  x1, v, x2: [B, L, D] (same dtype, bf16 or f32); log_poles, residues: [D, N]; dskip: [D] or
  None; initial_state: [B, D, N] float32 or None (zeros). Differentiable in every array
  argument (``jax.custom_vjp``); ``interpret`` runs the Pallas interpreter (CPU tests);
  ``poison`` starts the outputs as NaN (tests).
  """
  check_inputs(x1, v, x2, log_poles, residues, dskip, initial_state)
  opts = (block_sizes or DEFAULT_FWD, bwd_block_sizes or DEFAULT_BWD, dskip is not None,
          interpret, poison)
  d = jnp.zeros((x1.shape[2],), F32) if dskip is None else dskip
  s0 = (jnp.zeros((x1.shape[0], x1.shape[2], log_poles.shape[1]), F32)
        if initial_state is None else initial_state)
  return _modal_scan(x1, v, x2, log_poles, residues, d, s0, opts)


def gated_modal_scan(x1, v, x2, log_poles, residues, dskip=None, **kwargs) -> jax.Array:
  """The LI core ``y`` alone (the dispatch entry point): ``modal_scan(...)[0]``."""
  return modal_scan(x1, v, x2, log_poles, residues, dskip, **kwargs)[0]


# ----------------------------------------------------------------------------- reference


def modal_scan_reference(x1, v, x2, log_poles, residues, dskip=None, initial_state=None):
  """Plain-jnp reference of ``modal_scan`` through the FFT path (``ops.fir.fft_conv`` of
  ``ops.modal.modal_filter``), ``ops.modal.state_response`` and ``modal_state``:
  (y, final_state)."""
  length = x1.shape[1]
  h = modal.modal_filter(log_poles, residues, length)
  lam = log_poles.astype(F32)

  def filt(u):
    y = fir.fft_conv(u, h).astype(F32)
    if initial_state is not None:
      y = y + modal.state_response(initial_state, log_poles, residues, length)
    return y

  y = fir.gated_conv(x1, v, x2, filt, dskip)
  s = modal.modal_state(x1 * v, log_poles)
  if initial_state is not None:
    s = s + jnp.exp(lam * length)[None] * initial_state.astype(F32)
  return y, s
