"""The gated FIR Pallas kernels against an independent float64 numpy direct convolution.

Runs the kernels in the Pallas interpreter on CPU and compiled (Triton) when a GPU is present.
Every run starts from NaN-poisoned outputs (``poison=True``), so an unwritten element fails.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax.kernels import _pallas, fir_conv, fir_layout
from sh2_jax.kernels.fir_conv import BlockSizes, gated_fir_conv
from sh2_jax import dispatch

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def numpy_gated_fir(x1, v, x2, h, dskip, dy):
  """float64 forward y and the gradients (dx1, dv, dx2, dh, ddskip) for cotangent dy."""
  x1, v, x2, h, dy = (np.asarray(a, np.float64) for a in (x1, v, x2, h, dy))
  _, length, d = x1.shape
  groups, taps = h.shape
  hc = np.repeat(h, d // groups, axis=0)  # [D, K]
  skip = np.zeros(d) if dskip is None else np.asarray(dskip, np.float64)
  u = x1 * v
  z = skip * u
  for k in range(min(taps, length)):
    z[:, k:] += hc[:, k] * u[:, :length - k]
  dz = dy * x2
  du = skip * dz
  dhc = np.zeros_like(hc)
  for k in range(min(taps, length)):
    du[:, :length - k] += hc[:, k] * dz[:, k:]
    dhc[:, k] = np.einsum("btd,btd->d", dz[:, k:], u[:, :length - k])
  dh = dhc.reshape(groups, d // groups, taps).sum(axis=1)
  return x2 * z, (du * v, du * x1, dy * z, dh, (dz * u).sum(axis=(0, 1)))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.isfinite(a).all(), "non-finite (unwritten or NaN) elements"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [
    # B, L, D, G, K, dtype, skip, block sizes (None = defaults)
    (2, 150, 32, 2, 7, jnp.float32, True, None),                       # G = D/16
    (2, 200, 48, 48, 3, jnp.float32, True, None),                      # G = D (1 channel/group)
    (3, 300, 32, 1, 128, jnp.float32, True, None),                     # G = 1, MR length
    (2, 170, 64, 4, 64, jnp.bfloat16, False, None),                    # G = D/16, bf16
    (2, 260, 30, 2, 7, jnp.bfloat16, True, None),                      # 15 channels/group
    (2, 140, 45, 3, 128, jnp.float32, True, None),                     # 15 channels/group, K=128
    (2, 130, 45, 3, 7, jnp.bfloat16, True,                             # 15 channels/group, slots
     BlockSizes(chunk=32, tile=32, width=16, seg_chunks=2, align_groups=False)),
    (3, 77, 75, 5, 7, jnp.float32, True,                               # aligned, a padding group
     BlockSizes(chunk=32, tile=64, width=16, seg_chunks=2, align_groups=True)),  # in the tile
    (2, 90, 72, 3, 64, jnp.bfloat16, True, None),                      # 24/group: width 32
    (2, 70, 15, 1, 7, jnp.float32, False, None),                       # D < width
    (2, 170, 64, 4, 7, jnp.float32, True,                              # several segments,
     BlockSizes(chunk=32, tile=64, width=16, seg_chunks=2, chunk_outer=False)),  # group-outer
    (2, 170, 64, 4, 7, jnp.bfloat16, True,                             # grid-filling segments
     BlockSizes(chunk=32, tile=32, width=16, seg_chunks=6, min_programs=64)),
    (3, 190, 32, 32, 64, jnp.bfloat16, True,                           # G = D, segments
     BlockSizes(chunk=64, tile=32, width=32, seg_chunks=2, chunk_outer=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}L{c[1]}D{c[2]}G{c[3]}K{c[4]}"
                         f"{jnp.dtype(c[5]).name}{'s' if c[6] else ''}{'bs' if c[7] else ''}")
def test_forward_and_gradients(case):
  batch, length, d, groups, taps, dtype, has_skip, bs = case
  rng = np.random.default_rng(abs(hash(case[:6])) % 2**32)
  x1, v, x2, dy = (jnp.asarray(rng.standard_normal((batch, length, d)), dtype) for _ in range(4))
  h = jnp.asarray(rng.standard_normal((groups, taps)) / np.sqrt(taps), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(d), jnp.float32) if has_skip else None
  tol = 1e-5 if dtype == jnp.float32 else 1e-2

  def op(x1, v, x2, h, dskip):
    return gated_fir_conv(x1, v, x2, h, dskip, interpret=INTERPRET, block_sizes=bs,
                          bwd_block_sizes=bs, poison=True)

  args = (x1, v, x2, h, dskip)
  y, vjp = jax.vjp(op, *args)
  grads = vjp(dy)
  # The reference sees the inputs as rounded to the kernel dtype (bf16 inputs exactly).
  y_ref, grads_ref = numpy_gated_fir(*(np.asarray(a.astype(jnp.float32)) for a in (x1, v, x2)),
                                     h, dskip, np.asarray(dy.astype(jnp.float32)))
  assert y.dtype == dtype and y.shape == x1.shape
  assert rel_err(y, y_ref) <= tol
  names = ("dx1", "dv", "dx2", "dh", "ddskip")
  for name, g, g_ref, a in zip(names, grads, grads_ref, args):
    if a is None:
      assert g is None
      continue
    assert g.shape == a.shape and g.dtype == a.dtype, name
    err = rel_err(g, g_ref)
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol}"


def test_matches_xla_reference():
  """The kernel and the model's XLA path (the one definition of the math) agree."""
  rng = np.random.default_rng(1)
  x1, v, x2 = (jnp.asarray(rng.standard_normal((2, 100, 32)), jnp.float32) for _ in range(3))
  h = jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)
  y = gated_fir_conv(x1, v, x2, h, None, interpret=INTERPRET, poison=True)
  assert rel_err(y, fir_conv.gated_fir_conv_reference(x1, v, x2, h)) <= 1e-5


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((1, 64, 32), jnp.float32)
  with pytest.raises(ValueError, match="G=3 must divide channels D=32"):
    gated_fir_conv(x, x, x, jnp.ones((3, 7)), interpret=True)
  with pytest.raises(ValueError, match="K=200 exceeds the chunk c=128"):
    gated_fir_conv(x, x, x, jnp.ones((2, 200)), interpret=True, block_sizes=BlockSizes())
  with pytest.raises(ValueError, match="share one shape"):
    gated_fir_conv(x, x[:, :10], x, jnp.ones((2, 7)), interpret=True)
  with pytest.raises(ValueError, match=r"dskip must be \[D\]"):
    gated_fir_conv(x, x, x, jnp.ones((2, 7)), jnp.ones(5), interpret=True)


def test_poison_marks_unwritten_outputs():
  """The poisoning the tests rely on: a kernel that writes nothing leaves only NaN."""
  x = jnp.ones((16, 16), jnp.float32)
  (y,) = _pallas.call_pallas(lambda x_ref, y_ref: None, (jax.ShapeDtypeStruct(x.shape, x.dtype),),
                              (1,), BlockSizes(), INTERPRET, "noop", True, x)
  assert np.isnan(np.asarray(y)).all()


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error path")
def test_pallas_off_gpu_is_a_clear_error():
  x = jnp.ones((1, 64, 32), jnp.float32)
  with pytest.raises(ValueError, match="pass interpret=True"):
    gated_fir_conv(x, x, x, jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="conv_impl 'pallas' needs a GPU"):
    dispatch.gated_fir(x, x, x, jnp.ones((2, 7)), None, "pallas")
  assert dispatch.resolve_conv_impl("auto") == "xla"
  y = dispatch.gated_fir(x, x, x, jnp.ones((2, 7)), None, "pallas", interpret=True)
  assert y.shape == x.shape


@pytest.mark.skipif(not ON_GPU, reason="GPU dispatch")
def test_auto_is_pallas_on_gpu():
  assert dispatch.resolve_conv_impl("auto") == "pallas"


# ----------------------------------------------------------------------------- resources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAL = os.path.join(ROOT, "benchmarks", "fir_smem_h200.jsonl")


def measured_layout(row):
  """The Layout of one measured launch of ``benchmarks/fir_smem.py``."""
  bs = BlockSizes(chunk=row["chunk"], tile=row["tile"], width=row["width"],
                  chunk_outer=row["chunk_outer"], num_warps=row["warps"],
                  num_stages=row["stages"], rebuild=row["rebuild"], prefetch=row["prefetch"],
                  align_groups=row["aligned"])
  dtype = jnp.dtype(row["dtype"])
  return fir_layout.make_layout((1, 4096, row["D"]), (row["G"], row["K"]), bs, dtype.itemsize,
                                row["dir"] == "bwd")


def test_footprint_agrees_with_the_compiler():
  """``footprint`` against the shared memory the compiler allocated on an H200 (Nsight Compute's
  launch statistics; "requested" of XLA's overflow error): never below it, within 35% for the
  MR kernels (chunk 128, where the limit bites), within 48 KiB for the small SE kernels; every
  launch that overflowed is predicted not to fit."""
  rows = [json.loads(line) for line in open(CAL)]
  assert len(rows) >= 60 and {r["cpg"] for r in rows} >= {15, 16, 24}
  n_fail = 0
  for row in rows:
    lay = measured_layout(row)
    assert (lay.aligned, lay.slots, lay.rebuild) == (row["aligned"], row["slots"],
                                                     row["rebuild"]), row
    est = fir_layout.footprint(lay, row["dir"] == "bwd").smem
    got = row["smem"]
    assert got is not None, row
    assert est >= got, (row, est)
    if row["chunk"] == 128:
      assert est <= 1.35 * got, (row, est)
    else:
      assert est - got <= 48 * 1024, (row, est)
    if not row["compiled"]:
      n_fail += 1
      assert est > fir_layout.SMEM_LIMIT, (row, est)
  assert n_fail >= 2  # the sweep holds overflowing launches (the old evo2_1b MR forward's kind)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_chosen_block_sizes_fit_every_geometry(dtype):
  """Channels per group 1..64 (odd included), filter lengths 3..128, forward and backward: the
  launcher's choice fits Hopper's 227 KiB of shared memory per block, and is the tuned default
  wherever that fits."""
  for cpg in range(1, 65):
    for groups in (8, 128):
      for taps in (3, 7, 64, 127, 128):
        for backward in (False, True):
          shape, hs = (1, 4096, cpg * groups), (groups, taps)
          bs = fir_conv.choose_block_sizes(shape, hs, dtype, backward)
          lay = fir_layout.make_layout(shape, hs, bs, jnp.dtype(dtype).itemsize, backward)
          fp = fir_layout.footprint(lay, backward)
          assert fp.smem <= fir_layout.SMEM_LIMIT, (cpg, groups, taps, backward, fp)
          first = fir_layout.candidates(taps, backward, dtype)[0]
          lay0 = fir_layout.make_layout(shape, hs, first, jnp.dtype(dtype).itemsize, backward)
          if fir_layout.footprint(lay0, backward).smem <= fir_layout.SMEM_LIMIT:
            assert bs == first


def test_evo2_1b_geometry_is_aligned_and_fits():
  """The evo2_1b MR layer (D = 1920, 128 groups of 15): one group per 16-column sub-block, the
  Toeplitz blocks built once (the launch that overflowed had 2 slots, rebuilt per chunk)."""
  for backward in (False, True):
    bs = fir_conv.choose_block_sizes((1, 8192, 1920), (128, 128), jnp.bfloat16, backward)
    lay = fir_layout.make_layout((1, 8192, 1920), (128, 128), bs, 2, backward)
    assert lay.aligned and lay.slots == 1 and not lay.rebuild
    assert lay.padded_channels == 1920  # no channel padding copy
    assert fir_layout.footprint(lay, backward).smem <= fir_layout.SMEM_LIMIT


def test_no_fit_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(fir_layout, "SMEM_LIMIT", 1024)
  x = jnp.ones((1, 64, 30), jnp.float32)
  with pytest.raises(fir_conv.DoesNotFit, match=r"D=30, G=2 \(15 channels per group\), K=7"):
    gated_fir_conv(x, x, x, jnp.ones((2, 7)), interpret=True)
  with pytest.raises(ValueError, match="conv_impl 'pallas' cannot run this layer"):
    dispatch.gated_fir(x, x, x, jnp.ones((2, 7)), None, "pallas", interpret=True)


def test_auto_falls_back_to_xla_with_one_warning(monkeypatch):
  """``auto`` on a GPU with a geometry no configuration fits: XLA, one warning, same numbers."""
  monkeypatch.setattr(fir_layout, "SMEM_LIMIT", 1024)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  dispatch._warn_fallback.cache_clear()
  rng = np.random.default_rng(3)
  x1, v, x2 = (jnp.asarray(rng.standard_normal((2, 50, 30)), jnp.float32) for _ in range(3))
  h = jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)
  with pytest.warns(UserWarning, match="conv_impl 'auto': using 'xla'.*15 channels per group"):
    y = dispatch.gated_fir(x1, v, x2, h, None, "auto")
  monkeypatch.undo()
  assert rel_err(y, dispatch.gated_fir(x1, v, x2, h, None, "xla")) <= 1e-6


@pytest.mark.skipif(not ON_GPU, reason="the compiler's shared-memory limit exists only on a GPU")
def test_compiler_accepts_what_footprint_admits():
  """On the GPU: every candidate ``footprint`` admits compiles and runs (the launcher never picks
  a launch the compiler refuses), and the launch the evo2_1b forward used to take (2 slots,
  Toeplitz blocks rebuilt per chunk, 3 stages) overflows with the size the estimate gives."""
  rng = np.random.default_rng(5)
  for d, g in ((1920, 128), (4096, 256), (768, 256)):
    # 32 chunks per program: loops long enough for the compiler to pipeline them
    x = jnp.asarray(rng.standard_normal((1, 4096, d)), jnp.bfloat16)
    h = jnp.asarray(rng.standard_normal((g, 128)), jnp.float32)
    seen = set()
    for bs in fir_layout.candidates(128, False, jnp.bfloat16)[:8]:
      lay = fir_layout.make_layout(x.shape, h.shape, bs, 2)
      key = (lay.aligned, lay.slots, lay.rebuild, lay.bs.num_stages, lay.bs.chunk_outer)
      if key in seen:
        continue
      seen.add(key)
      if fir_layout.footprint(lay).smem <= fir_layout.SMEM_LIMIT:
        y = jax.jit(lambda a, hh, bs=bs: fir_conv.fwd(a, a, a, hh, None, bs))(x, h)
        assert np.isfinite(np.asarray(y, np.float32)).all()
  x = jnp.asarray(rng.standard_normal((1, 8192, 1920)), jnp.bfloat16)
  h = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
  old = BlockSizes(chunk=128, tile=16, width=16, seg_chunks=32, num_warps=4, num_stages=3,
                   prefetch=False, align_groups=False)
  lay = fir_layout.make_layout(x.shape, h.shape, old, 2)
  assert lay.slots == 2 and lay.rebuild
  est = fir_layout.footprint(lay).smem
  with pytest.raises(Exception, match=f"requested {est}"):
    jax.block_until_ready(jax.jit(lambda a, hh: fir_conv.fwd(a, a, a, hh, None, old))(x, h))
