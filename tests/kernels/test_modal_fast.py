"""The fast token-serial LI kernels (``sh2_jax/kernels/modal_fast.py`` and ``modal_fast_bwd.py``)
against float64 references that share nothing with them: a dense [D, L, L] Toeplitz
formulation differentiated by JAX (every gradient, the final state) and a numpy FFT of the
float64 modal filter (a longer forward). Runs in the Pallas interpreter on CPU; every launch
starts from NaN-poisoned outputs (``poison=True``), so an element a kernel fails to write fails
the test. Shapes are odd on purpose: L not a multiple of the chunk or the segment (a masked
tail, a short last segment), D not a multiple of the tile, B > 1, N not a power of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax import dispatch
from sh2_jax.kernels import modal_fast as mf
from sh2_jax.kernels.modal_fast_layout import FastBlocks, backward_geometry, make_geometry
from test_modal_scan import make_inputs  # one generator of LI inputs (poles at both extremes)

INTERPRET = jax.default_backend() != "gpu"
TOL = 1e-5
NAMES = ("x1", "v", "x2", "log_poles", "residues", "dskip", "initial_state")


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.isfinite(a).all(), "non-finite (unwritten or NaN) elements"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def dense_f64(x1, v, x2, lam, res, dskip, s0):
  """float64: the gated modal convolution as a dense Toeplitz product plus the initial state's
  response, and the final state in closed form (differentiable by JAX)."""
  length = x1.shape[1]
  t = jnp.arange(length, dtype=jnp.float64)
  lag = t[:, None] - t[None, :]
  decay = jnp.exp(lam[..., None, None] * jnp.maximum(lag, 0.0))            # [D, N, L, L]
  toe = jnp.where(lag >= 0, jnp.einsum("dn,dnij->dij", res, decay), 0.0)
  u = x1 * v
  z = jnp.einsum("dij,bjd->bid", toe, u) + dskip * u
  z += jnp.einsum("dn,tdn,bdn->btd", res, jnp.exp(lam[None] * (t + 1)[:, None, None]), s0)
  s_end = (jnp.einsum("btd,tdn->bdn", u, jnp.exp(lam[None] * (length - 1 - t)[:, None, None]))
           + jnp.exp(lam * length) * s0)
  return x2 * z, s_end


def fast(*args, bs):
  return mf.modal_fast(*args, interpret=INTERPRET, poison=True, block_sizes=bs)


GRAD_CASES = [
    # seed, B, L, D, N, block sizes, with dskip, with s0
    # 157 tokens: 40 chunks of 4 (a masked tail), 20 segments of 2 chunks (more than one group
    # of the segment scans); D = 20 on tiles of 16
    (1, 2, 157, 20, 3, FastBlocks(tile=16, chunk=4, segment=8), True, True),
    # L a multiple of the chunk (no masked tail) but not of the segment (the 6th segment has 2
    # of 4 chunks); unfused backward (its own adjoint-states pass), no prefetch, no dskip, no s0
    (2, 1, 44, 9, 3, FastBlocks(tile=16, chunk=2, segment=8, prefetch=False, fuse_adjoint=False),
     False, False),
    # the backward on narrower tiles than the forward (D = 33: 64 padded channels forward, 48
    # backward); the fused adjoint start states summed token by token instead of by chunks
    (3, 2, 30, 33, 2, FastBlocks(tile=32, chunk=2, segment=8, bwd_tile=16, horner=False), True,
     True),
    # one segment: no first pass, no scans
    (7, 1, 13, 5, 2, FastBlocks(tile=16, chunk=2, segment=512), True, True),
]


@pytest.mark.parametrize("seed,batch,length,width,states,bs,with_skip,with_s0", GRAD_CASES)
def test_gradients_against_float64(seed, batch, length, width, states, bs, with_skip, with_s0):
  """y, the final state and the gradients of every argument for random cotangents of both."""
  x1, v, x2, lam, res, dskip, s0 = make_inputs(seed, batch, length, width, states)
  args = [x1, v, x2, lam, res] + ([dskip] if with_skip else []) + ([s0] if with_s0 else [])
  rng = np.random.default_rng(seed + 100)
  dy = rng.standard_normal((batch, length, width))
  ds = rng.standard_normal((batch, width, states))

  def call(f, *a):
    a = list(a)
    skip = a.pop(5) if with_skip else None
    state = a.pop(5) if with_s0 else None
    return f(*a, skip, state)

  def ref(*a):
    zero_skip = jnp.zeros((width,), jnp.float64)
    zero_s0 = jnp.zeros((batch, width, states), jnp.float64)
    return dense_f64(*a[:5], a[5] if with_skip else zero_skip,
                     a[-1] if with_s0 else zero_s0)

  def loss(f, *a):
    y, s = f(*a)
    return jnp.sum(y * dy.astype(y.dtype)) + jnp.sum(s * ds.astype(s.dtype))

  run = functools.partial(call, functools.partial(fast, bs=bs))
  y, s = run(*args)
  grads = jax.grad(functools.partial(loss, run), argnums=range(len(args)))(*args)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
    y_ref, s_ref = (np.asarray(r) for r in ref(*args64))
    refs = [np.asarray(r) for r in
            jax.grad(functools.partial(loss, ref), argnums=range(len(args)))(*args64)]
  assert y.shape == (batch, length, width) and s.shape == (batch, width, states)
  assert rel_err(y, y_ref) <= TOL and rel_err(s, s_ref) <= TOL
  names = [n for n in NAMES if (n != "dskip" or with_skip) and (n != "initial_state" or with_s0)]
  errs = {n: rel_err(g, r) for n, g, r in zip(names, grads, refs)}
  assert all(e <= TOL for e in errs.values()), errs


def test_forward_long_sequence():
  """The inference path (no ds/dlambda in the first pass): L = 1001 over 32 segments, N = 16,
  against a numpy float64 FFT convolution; and the geometry of shorter segments for short
  sequences."""
  x1, v, x2, lam, res, dskip, s0 = make_inputs(4, 1, 1001, 12, 16)
  geo = make_geometry(x1.shape, lam.shape, FastBlocks(tile=16, chunk=8, segment=256))
  assert (geo.num_segments, geo.last_length, geo.padded_length) == (16, 41, 1008)  # halved
  wide = make_geometry((1, 1001, 4096), lam.shape, FastBlocks(tile=16, chunk=8, segment=256))
  assert (wide.bs.tile, wide.num_segments) == (16, 4)  # 256 tiles x 4 segments: as given
  # a wider forward tile halves the forward's segments; the backward keeps them
  two = FastBlocks(tile=256, bwd_tile=128)
  fwd, bwd = (f((1, 16384, 4096), (4096, 16), two) for f in (make_geometry, backward_geometry))
  assert (fwd.bs.tile, fwd.segment_length, bwd.bs.tile, bwd.segment_length) == (256, 256, 128, 256)
  bs = FastBlocks(tile=16, chunk=4, segment=32)
  assert make_geometry(x1.shape, lam.shape, bs).num_segments == 32
  y, s = fast(x1, v, x2, lam, res, dskip, s0, bs=bs)
  a64 = [np.asarray(a, np.float64) for a in (x1, v, x2, lam, res, dskip, s0)]
  x1n, vn, x2n, lamn, resn, dskn, s0n = a64
  t = np.arange(1001, dtype=np.float64)
  h = np.einsum("dn,dnt->dt", resn, np.exp(lamn[..., None] * t))
  u = x1n * vn
  n = 2048
  z = np.fft.irfft(np.fft.rfft(u, n=n, axis=1) * np.fft.rfft(h.T, n=n, axis=0)[None], n=n,
                   axis=1)[:, :1001]
  z += np.einsum("dn,tdn,bdn->btd", resn, np.exp(lamn[None] * (t + 1)[:, None, None]), s0n)
  z += dskn * u
  s_ref = (np.einsum("btd,tdn->bdn", u, np.exp(lamn[None] * (1000 - t)[:, None, None]))
           + np.exp(lamn * 1001) * s0n)
  assert rel_err(y, x2n * z) <= TOL and rel_err(s, s_ref) <= TOL


def test_bfloat16_and_dispatch():
  """bf16 in and out through ``li_impl = modal_fast`` (float32 states): within bf16 rounding
  of the FFT path, bf16 gradients, and the with-state entry returns the end state."""
  x1, v, x2, lam, res, dskip, _ = make_inputs(5, 2, 40, 16, 2)
  xb = [a.astype(jnp.bfloat16) for a in (x1, v, x2)]
  y = dispatch.gated_modal(*xb, lam, res, dskip, "modal_fast", interpret=INTERPRET)
  ref = dispatch.gated_modal(*xb, lam, res, dskip, "fft")
  assert y.dtype == jnp.bfloat16 and rel_err(y, ref) < 1e-2
  f = dispatch.modal_with_state_fn("modal_fast", interpret=INTERPRET)
  g = jax.grad(lambda a: jnp.sum(f(a, *xb[1:], lam, res, dskip)[0].astype(jnp.float32)))(xb[0])
  assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
  y2, s = f(*xb, lam, res, dskip)
  _, s_ref = dispatch.modal_with_state_fn("fft")(*xb, lam, res, dskip)
  assert rel_err(y2, ref) < 1e-2 and rel_err(s, s_ref) < 1e-2


def test_bad_block_sizes_name_the_value():
  x1, v, x2, lam, res, _, _ = make_inputs(6, 1, 20, 8, 2)
  with pytest.raises(ValueError, match=r"FastBlocks.tile=24 must be a power of two"):
    mf.modal_fast(x1, v, x2, lam, res, block_sizes=FastBlocks(tile=24), interpret=True)
  with pytest.raises(ValueError, match=r"FastBlocks.segment=4 must be >= chunk=8"):
    mf.modal_fast(x1, v, x2, lam, res, block_sizes=FastBlocks(segment=4), interpret=True)
  with pytest.raises(ValueError, match=r"log_poles and residues must both be \[D=8, N\]"):
    mf.modal_fast(x1, v, x2, lam[:4], res, interpret=True)
