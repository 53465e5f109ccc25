"""The FFT-free LI kernels (``sh2_jax/kernels/modal_scan.py``, chunked, and
``modal_scan_serial.py``, token-serial) against independent float64
references: a numpy FFT convolution of the float64 modal filter (long forward), and a dense
float64 Toeplitz formulation differentiated by JAX (every gradient). Runs the kernels in the
Pallas interpreter on CPU; every run starts from NaN-poisoned outputs (``poison=True``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax.kernels import modal_scan as ms
from sh2_jax.kernels import modal_scan_serial as mss
from sh2_jax.kernels.modal_scan import BlockSizes
from sh2_jax import dispatch

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

INTERPRET = jax.default_backend() != "gpu"
TOL = 1e-5


def make_inputs(seed, batch, length, width, states=16, dtype=jnp.float32):
  """Random odd-shaped inputs; poles log-uniform from exp(lambda) = 1 - 1e-5 to e^-8, with the
  two extremes always present."""
  rng = np.random.default_rng(seed)
  x1, v, x2 = (rng.standard_normal((batch, length, width)) for _ in range(3))
  rates = np.exp(rng.uniform(np.log(1e-5), np.log(8.0), (width, states)))
  rates[0, 0], rates[-1, -1] = 1e-5, 8.0
  res = rng.standard_normal((width, states)) * 0.1
  dskip = rng.standard_normal(width)
  s0 = rng.standard_normal((batch, width, states))
  arrs = [jnp.asarray(a, dtype) for a in (x1, v, x2)]
  arrs += [jnp.asarray(a, jnp.float32) for a in (-rates, res, dskip, s0)]
  return arrs


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.isfinite(a).all(), "non-finite (unwritten or NaN) elements"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def numpy_forward(x1, v, x2, lam, res, dskip, s0):
  """float64: y by FFT of the float64 modal filter plus the initial state's response, and the
  final state by its closed form."""
  x1, v, x2, lam, res, dskip, s0 = (np.asarray(a, np.float64) for a in
                                    (x1, v, x2, lam, res, dskip, s0))
  _, length, _ = x1.shape
  t = np.arange(length, dtype=np.float64)
  h = np.einsum("dn,dnt->dt", res, np.exp(lam[..., None] * t))
  u = x1 * v
  n = 2 * length
  z = np.fft.irfft(np.fft.rfft(u, n=n, axis=1) * np.fft.rfft(h.T, n=n, axis=0)[None], n=n,
                   axis=1)[:, :length]
  z += np.einsum("dn,tdn,bdn->btd", res, np.exp(lam[None] * (t + 1)[:, None, None]), s0)
  z += dskip * u
  s_end = (np.einsum("btd,tdn->bdn", u, np.exp(lam[None] * (length - 1 - t)[:, None, None]))
           + np.exp(lam * length) * s0)
  return x2 * z, s_end


def dense_f64(x1, v, x2, lam, res, dskip, s0):
  """float64 jnp: the gated modal convolution as a dense [D, L, L] Toeplitz product (small L),
  differentiable by JAX — shares nothing with the kernels' chunked recurrence."""
  length = x1.shape[1]
  t = jnp.arange(length, dtype=jnp.float64)
  lag = t[:, None] - t[None, :]
  decay = jnp.exp(lam[..., None, None] * jnp.maximum(lag, 0.0))            # [D, N, L, L]
  toe = jnp.where(lag >= 0, jnp.einsum("dn,dnij->dij", res, decay), 0.0)
  u = x1 * v
  z = jnp.einsum("dij,bjd->bid", toe, u)
  z += jnp.einsum("dn,tdn,bdn->btd", res, jnp.exp(lam[None] * (t + 1)[:, None, None]), s0)
  z += dskip * u
  s_end = (jnp.einsum("btd,tdn->bdn", u, jnp.exp(lam[None] * (length - 1 - t)[:, None, None]))
           + jnp.exp(lam * length) * s0)
  return x2 * z, s_end


def scan(*args, bs=None, bwd_bs=None, form="chunked"):
  if form in ("serial", "serial_rows"):  # serial_rows: the compiled kernels' per-row state I/O
    return mss.modal_scan_serial(*args, interpret=INTERPRET, poison=True, block_sizes=bs,
                                 rows_io=True if form == "serial_rows" else None)
  return ms.modal_scan(*args, interpret=INTERPRET, poison=True, block_sizes=bs,
                       bwd_block_sizes=bwd_bs)


def test_forward_long_sequence():
  """L = 2100 (not a multiple of the chunk), D = 24 (padded to the tile), one segment and a
  segmented launch, against the float64 FFT path."""
  args = make_inputs(0, 2, 2100, 24)
  y_ref, s_ref = numpy_forward(*args)
  for form, bs in (("chunked", None), ("chunked", BlockSizes(chunk=16, tile=16, segment_chunks=24)),
                   ("serial", BlockSizes(chunk=4, tile=32, segment_chunks=35))):
    y, s = scan(*args, bs=bs, form=form)
    assert y.shape == (2, 2100, 24) and s.shape == (2, 24, 16)
    assert rel_err(y, y_ref) <= TOL, (bs, rel_err(y, y_ref))
    assert rel_err(s, s_ref) <= TOL, (bs, rel_err(s, s_ref))


GRAD_CASES = [
    # form, seed, B, L, D, forward / backward block sizes
    ("chunked", 1, 2, 157, 20, None, None),
    ("chunked", 2, 1, 300, 17, BlockSizes(chunk=8, tile=8, segment_chunks=6, prefetch=False),
     BlockSizes(chunk=16, tile=16, segment_chunks=4)),
    ("chunked", 3, 3, 96, 33, BlockSizes(chunk=32, tile=32),
     BlockSizes(chunk=8, tile=16, segment_chunks=3)),
    ("serial", 4, 2, 157, 20, BlockSizes(chunk=4, tile=16, segment_chunks=8), None),
    ("serial", 5, 1, 45, 9, BlockSizes(chunk=4, tile=8, segment_chunks=4), None),
]


@pytest.mark.parametrize("form,seed,batch,length,width,bs,bwd_bs", GRAD_CASES)
def test_gradients_against_float64(form, seed, batch, length, width, bs, bwd_bs):
  """y, the final state and the gradients of x1, v, x2, log_poles, residues, dskip and the
  initial state for random cotangents of both outputs."""
  args = make_inputs(seed, batch, length, width)
  rng = np.random.default_rng(seed + 100)
  dy = rng.standard_normal((batch, length, width))
  ds = rng.standard_normal((batch, width, 16))

  def loss(f, *a):
    y, s = f(*a)
    return jnp.sum(y * dy.astype(y.dtype)) + jnp.sum(s * ds.astype(s.dtype))

  run = functools.partial(scan, bs=bs, bwd_bs=bwd_bs, form=form)
  y, s = run(*args)
  grads = jax.grad(functools.partial(loss, run), argnums=range(7))(*args)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
    y_ref, s_ref = dense_f64(*args64)
    refs = jax.grad(functools.partial(loss, dense_f64), argnums=range(7))(*args64)
    y_ref, s_ref, refs = np.asarray(y_ref), np.asarray(s_ref), [np.asarray(r) for r in refs]
  assert rel_err(y, y_ref) <= TOL and rel_err(s, s_ref) <= TOL
  names = ("x1", "v", "x2", "log_poles", "residues", "dskip", "initial_state")
  errs = {n: rel_err(g, r) for n, g, r in zip(names, grads, refs)}
  assert all(e <= TOL for e in errs.values()), errs


def test_serial_row_state_io():
  """The compiled token-serial kernels move states row by row (``rows_io``); same results."""
  args = make_inputs(9, 2, 61, 9)
  y_ref, s_ref = numpy_forward(*args)
  y, s = scan(*args, bs=BlockSizes(chunk=4, tile=8, segment_chunks=4), form="serial_rows")
  assert rel_err(y, y_ref) <= TOL and rel_err(s, s_ref) <= TOL


def test_bfloat16_inputs():
  """bf16 in and out (float32 states): within bf16 rounding of the float64 result."""
  args = make_inputs(4, 2, 130, 16, dtype=jnp.bfloat16)
  y, s = scan(*args)
  assert y.dtype == jnp.bfloat16
  y_ref, s_ref = numpy_forward(*[np.asarray(a, np.float64) for a in args])
  assert rel_err(y, y_ref) < 1e-2 and rel_err(s, s_ref) < 1e-2
  g = jax.grad(lambda x1: jnp.sum(scan(x1, *args[1:])[0].astype(jnp.float32)))(args[0])
  assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_state_round_trip():
  """Splitting a sequence in two and passing the final state on gives the one-call result
  (prefill for generation; the context-parallel state passing relies on it)."""
  x1, v, x2, lam, res, dskip, s0 = make_inputs(5, 2, 411, 20)
  y, s = scan(x1, v, x2, lam, res, dskip, s0)
  cut = 173
  ya, sa = scan(x1[:, :cut], v[:, :cut], x2[:, :cut], lam, res, dskip, s0)
  yb, sb = scan(x1[:, cut:], v[:, cut:], x2[:, cut:], lam, res, dskip, sa)
  assert rel_err(jnp.concatenate([ya, yb], axis=1), y) <= TOL
  assert rel_err(sb, s) <= TOL
  # ... and the state is the decode path's: one ops.modal.modal_step per token from s0
  from sh2_jax.ops import modal
  state = s0
  for t in range(cut):
    _, state = modal.modal_step(state, x1[:, t] * v[:, t], lam, res)
  assert rel_err(sa, state) <= TOL


def test_reference_matches_float64():
  """The plain-jnp reference beside the kernel (FFT path + ops.modal.modal_state) is itself right."""
  args = make_inputs(6, 2, 200, 12)
  y, s = ms.modal_scan_reference(*args)
  y_ref, s_ref = numpy_forward(*args)
  assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_li_auto_by_length(monkeypatch):
  """On a GPU ``auto`` takes ``modal_fast`` from ``LI_FAST_MIN_LEN`` tokens, ``modal_scan``
  below it and where no length is given; elsewhere the FFT reference at any length."""
  n = dispatch.LI_FAST_MIN_LEN
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert {dispatch.resolve_li_impl("auto", length=m) for m in (None, n - 1, n)} == {"fft"}
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert [dispatch.resolve_li_impl("auto", length=m) for m in (None, n - 1, n, 2 * n)] == [
      "modal_scan", "modal_scan", "modal_fast", "modal_fast"]
  assert dispatch.resolve_li_impl("modal_scan", length=2 * n) == "modal_scan"


def test_dispatch_li_impl():
  args = make_inputs(7, 1, 90, 16)[:6]
  ref = dispatch.gated_modal(*args, "fft")
  for impl in ("modal_scan", "modal_serial"):
    out = dispatch.gated_modal(*args, impl, interpret=INTERPRET)
    assert rel_err(out, ref) < 1e-5, impl
  assert dispatch.resolve_li_impl("auto") in ("modal_scan", "fft")
  with pytest.raises(ValueError, match="li_impl 'pallas' is not one of"):
    dispatch.gated_modal(*args, "pallas")


def test_bad_inputs_name_the_value():
  x1, v, x2, lam, res, dskip, s0 = make_inputs(8, 1, 20, 8)
  with pytest.raises(ValueError, match=r"x1, v, x2 must share one shape"):
    ms.modal_scan(x1, v[:, :10], x2, lam, res)
  with pytest.raises(ValueError, match=r"log_poles and residues must both be \[D=8, N\]"):
    ms.modal_scan(x1, v, x2, lam[:4], res)
  with pytest.raises(ValueError, match=r"initial state must be \[B, D, N\]"):
    ms.modal_scan(x1, v, x2, lam, res, dskip, s0[:, :, :3])
  with pytest.raises(ValueError, match=r"BlockSizes.chunk=12 must be a power of two"):
    ms.modal_scan(x1, v, x2, lam, res, block_sizes=BlockSizes(chunk=12), interpret=True)
