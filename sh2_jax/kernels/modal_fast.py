"""The LI core at the memory floor: a token-serial recurrence with the N states as N separate
[tile] vectors (Pallas / Triton). Same contract as ``modal_scan.modal_scan``:

    y = x2 * (h * u + dskip * u),   u = x1 * v,   h[d, t] = sum_n R[d, n] exp(lambda[d, n] t)

x1, v, x2: [B, L, D] (bf16 or f32); log_poles lambda, residues R: [D, N] float32 (lambda < 0, any
N); dskip: [D] or None; initial state s0: [B, D, N] float32 or None. Returns y [B, L, D] and the
final state [B, D, N] float32 (``ops.modal.modal_step``'s state after the last token).

Per token and channel the forward costs ``s_n <- a_n s_n + u`` and ``z += R_n s_n``: 2N float32
multiply-adds, all elementwise on [tile] vectors (``modal_fast_layout``: no reduction over N, no
layout conversions). L is cut into segments that run in parallel: a first pass sums each
segment's end state from zero (reads x1, v), one small scan kernel gives every segment its
incoming state, and the main pass recomputes from it and writes y (reads x1, v, x2). Six [L, D]
arrays move in all, against the floor's four.

The backward (``modal_fast_bwd.py``) is two passes: forward in time it recomputes s, z and
p = ds/dlambda (dx2 = dy z, dR, dlambda, ddskip, and each segment's own adjoint end state);
backward in time the adjoint W <- a (R g + W), g = dy x2, gives du (dx1, dv) and ds0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sh2_jax.kernels import modal_fast_bwd
from sh2_jax.kernels._pallas import call_pallas
from sh2_jax.kernels.modal_fast_layout import (F32, FastBlocks, Geometry, decays, ids, keep,
                                               load_rows, make_geometry, pad_params, pad_state,
                                               scan_segments, store_rows, token_rows,
                                               unpad_state, walk)
from sh2_jax.kernels.modal_geometry import check_inputs, pad_inputs

__all__ = ["DEFAULT", "FastBlocks", "gated_modal_fast", "modal_fast"]

DEFAULT = FastBlocks()


def gate_input(x1, v):
  """u = x1 * v in the input dtype (as ``ops.fir.gated_conv``), then float32."""
  return (x1 * v).astype(F32)


# ----------------------------------------------------------------------------- kernels


def _ends_kernel(lam_ref, x1_ref, v_ref, e_ref, *em_ref, geo: Geometry):
  """Segment si's end state from zero and, with ``em_ref``, m = p + s there, where p = ds/dlambda
  (p <- a (p + s), so m <- a m + s: one multiply-add); segments 0..S-2 only, all full."""
  b, cols, si = ids(geo)
  n = geo.states
  a = decays(lam_ref, cols, n)

  def step(k, carry, cur, masked):
    s, m = carry
    for x1, v in cur:
      u = gate_input(x1, v)
      s = tuple(ak * sk + u for ak, sk in zip(a, s))
      if em_ref:
        m = tuple(ak * mk + sk for ak, mk, sk in zip(a, m, s))
    return s, m

  zeros = tuple(jnp.zeros((geo.bs.tile,), F32) for _ in range(n))
  s, m = walk(geo, si, token_rows(geo, (x1_ref, v_ref), b, cols), step,
              (zeros, zeros if em_ref else ()), full=True)
  store_rows(e_ref, (b, si, cols), s)
  if em_ref:
    store_rows(em_ref[0], (b, si, cols), m)


def _fwd_kernel(lam_ref, res_ref, skip_ref, sin_ref, x1_ref, v_ref, x2_ref, y_ref, sT_ref, *,
                geo: Geometry):
  b, cols, si = ids(geo)
  n, c = geo.states, geo.bs.chunk
  a = decays(lam_ref, cols, n)
  r = load_rows(res_ref, (cols,), n)
  skip = skip_ref[cols]

  def step(k, s, cur, masked):
    for i, (x1, v, x2) in enumerate(cur):
      t = k * c + i
      u = gate_input(x1, v)
      s = keep(masked, t < geo.length, tuple(ak * sk + u for ak, sk in zip(a, s)), s)
      z = skip * u
      for rk, sk in zip(r, s):
        z = z + rk * sk
      y_ref[b, t, cols] = (x2.astype(F32) * z).astype(y_ref.dtype)
    return s

  s = walk(geo, si, token_rows(geo, (x1_ref, v_ref, x2_ref), b, cols), step,
           load_rows(sin_ref, (b, si, cols), n))

  @pl.when(si == geo.num_segments - 1)
  def _():
    store_rows(sT_ref, (b, cols), s)


# ----------------------------------------------------------------------------- launches


def launch_ends(geo: Geometry, lam, x1, v, with_p: bool, interpret=False, poison=False):
  """The first pass: from-zero end states of segments 0..S-2, [B, S-1, N, Dp] (and with
  ``with_p`` their m = ds/dlambda + s) from the padded x1, v and lambda rows [N, Dp]."""
  seg = jax.ShapeDtypeStruct((geo.batch, geo.num_segments - 1, geo.states,
                              geo.padded_channels), F32)
  grid = (geo.batch, geo.padded_channels // geo.bs.tile, geo.num_segments - 1)
  return call_pallas(functools.partial(_ends_kernel, geo=geo), (seg, seg) if with_p else (seg,),
                     grid, geo.bs, interpret, "modal_fast_ends", poison, lam, x1, v)


def launch_fwd(geo: Geometry, lam, res, skip, s_in, x1, v, x2, interpret=False, poison=False):
  """The main pass: (y [B, Lp, Dp], final state rows [B, N, Dp]) from every segment's incoming
  state s_in [B, S, N, Dp]."""
  rows = jax.ShapeDtypeStruct((geo.batch, geo.states, geo.padded_channels), F32)
  return call_pallas(functools.partial(_fwd_kernel, geo=geo),
                     (jax.ShapeDtypeStruct(x1.shape, x1.dtype), rows), geo.grid, geo.bs,
                     interpret, "modal_fast_fwd", poison, lam, res, skip, s_in, x1, v, x2)


def fwd(x1, v, x2, log_poles, residues, dskip, state, bs: FastBlocks, interpret: bool = False,
        poison: bool = False, with_p: bool = False):
  """(y, final_state, (s_in, m_in)): the forward launches; with_p also returns each segment's
  incoming m = ds/dlambda + s (the backward's), else m_in is None."""
  geo = make_geometry(x1.shape, log_poles.shape, bs)
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  xs = pad_inputs(geo, x1, v, x2)
  s0 = pad_state(geo, state)
  if geo.num_segments == 1:
    s_in = s0[:, None]
    m_in = s_in if with_p else None  # ds0/dlambda = 0
  else:
    ends = launch_ends(geo, lam, *xs[:2], with_p, interpret, poison)
    scanned = scan_segments(geo, lam, s0, ends[0], ends[1] if with_p else None, interpret,
                            poison)
    s_in, m_in = scanned if with_p else (scanned[0], None)
  y, s_out = launch_fwd(geo, lam, res, skip, s_in, *xs, interpret, poison)
  return y[:, :geo.length, :geo.channels], unpad_state(geo, s_out), (s_in, m_in)


# ----------------------------------------------------------------------------- public op


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _modal_fast(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs, has_skip, interpret, poison = opts
  return fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state, bs, interpret,
             poison)[:2]


def _modal_fast_fwd(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs, has_skip, interpret, poison = opts
  y, s_out, seg_states = fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state,
                             bs, interpret, poison, with_p=True)
  return (y, s_out), (x1, v, x2, log_poles, residues, dskip, seg_states)


def _modal_fast_bwd(opts, saved, cts):
  bs, has_skip, interpret, poison = opts
  x1, v, x2, log_poles, residues, dskip, seg_states = saved
  dy, ds_out = cts
  dx1, dv, dx2, dlam, dres, ddskip, dstate = modal_fast_bwd.bwd(
      x1, v, x2, log_poles, residues, dskip if has_skip else None, seg_states, dy, ds_out, bs,
      interpret, poison)
  return (dx1, dv, dx2, dlam.astype(log_poles.dtype), dres.astype(residues.dtype),
          ddskip.astype(dskip.dtype), dstate)


_modal_fast.defvjp(_modal_fast_fwd, _modal_fast_bwd)


def modal_fast(x1: jax.Array, v: jax.Array, x2: jax.Array, log_poles: jax.Array,
               residues: jax.Array, dskip: jax.Array | None = None,
               initial_state: jax.Array | None = None, *, interpret: bool = False,
               block_sizes: FastBlocks | None = None,
               poison: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(x2 * (h_modal * (x1 * v) + dskip * x1 * v), final_state)`` by the fast token-serial
  kernels; shapes and checks as ``modal_scan.modal_scan`` (its ``modal_scan_reference`` is the
  reference). Differentiable in every array argument (``jax.custom_vjp``); ``interpret`` runs
  the Pallas interpreter (CPU tests); ``poison`` starts the outputs as NaN (tests)."""
  check_inputs(x1, v, x2, log_poles, residues, dskip, initial_state)
  opts = (block_sizes or DEFAULT, dskip is not None, interpret, poison)
  d = jnp.zeros((x1.shape[2],), F32) if dskip is None else dskip
  s0 = (jnp.zeros((x1.shape[0], x1.shape[2], log_poles.shape[1]), F32)
        if initial_state is None else initial_state)
  return _modal_fast(x1, v, x2, log_poles, residues, d, s0, opts)


def gated_modal_fast(x1, v, x2, log_poles, residues, dskip=None, **kwargs) -> jax.Array:
  """The LI core ``y`` alone (the dispatch entry point): ``modal_fast(...)[0]``."""
  return modal_fast(x1, v, x2, log_poles, residues, dskip, **kwargs)[0]
