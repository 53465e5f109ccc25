"""The Mosaic GPU gated FIR kernels against the float64 numpy direct convolution.

On CPU the kernels run in Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``), which
simulates shared memory, TMA copies, barriers and wgmma; compiled on a GPU. Interpret mode fills
every fresh buffer with NaN, outputs included (checked below), so an element the kernel fails to
write fails ``rel_err``; compiled, the outputs start uninitialised (``plgpu.kernel`` has no
input/output aliasing to poison them), so there only a wrong value fails. The lowering test
runs Mosaic GPU's lowering and layout inference for a CUDA target on any host. Races between
warps exist only compiled: on a GPU one more test runs the default forward at 128K three times,
element by element against XLA (the prologue race it guards against passed every norm check).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from sh2_jax import dispatch
from sh2_jax.kernels import fir_conv_mgpu
from sh2_jax.kernels.fir_conv_mgpu import MgpuBlockSizes, gated_fir_conv_mgpu
from tests.kernels.test_fir_conv import numpy_gated_fir, rel_err

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = 1e-2  # bf16 inputs and outputs (the reference sees the same bf16 inputs exactly)

CASES = [
    # B, L, D, G, K, skip, seg_chunks (None: default); bf16, chunk 64
    (2, 150, 32, 2, 7, True, 2),      # 16 channels/group, odd L, two segments (halo)
    (1, 200, 64, 2, 64, True, 1),     # 32/group: width 32, K = chunk, a segment per chunk
    (2, 140, 32, 2, 128, True, 1),    # the MR length: two past chunks (three bands)
    (1, 300, 32, 1, 66, False, 2),    # just over one past chunk, G = 1 over two tiles, no skip
    (3, 70, 16, 1, 5, True, None),    # L barely over one chunk, batch 3
    (1, 130, 64, 4, 128, True, 1),    # 4 channel tiles: the forward's default takes 4 per program
]


def _inputs(case, seed=None):
  batch, length, d, groups, taps, has_skip = case[:6]
  rng = np.random.default_rng(seed if seed is not None else abs(hash(case)) % 2**32)
  x1, v, x2, dy = (jnp.asarray(rng.standard_normal((batch, length, d)), jnp.bfloat16)
                   for _ in range(4))
  h = jnp.asarray(rng.standard_normal((groups, taps)) / np.sqrt(taps), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(d), jnp.float32) if has_skip else None
  return x1, v, x2, dy, h, dskip


def _f32(a):
  return np.asarray(a.astype(jnp.float32))


# The kernel variants (MgpuBlockSizes switches; "split": the backward's differ from the
# forward's): every case runs the default and all switches on; the first three cases (a halo
# across two segments, a segment per chunk, three bands) each switch alone too.
VARIANTS = {
    "default": None,  # the op's defaults per direction (_block_sizes)
    "first": {},
    "ring": dict(ring=True),
    "slots2": dict(store_slots=2),
    "tiles2": dict(tiles=2),
    "wide": dict(wide=True, tiles=2),
    "narrow": dict(ring=True, store_slots=2, tiles=2),
    "all": dict(ring=True, store_slots=2, tiles=2, wide=True),
    "split": (dict(tiles=2, wide=True, stages=3), dict(ring=True, store_slots=2)),
}
VARIANT_CASES = ([(c, v) for c in CASES for v in ("default", "all")]
                 + [(c, v) for c in CASES[:3] for v in ("ring", "slots2", "tiles2", "wide",
                                                         "split")])


def _case_id(c):
  return f"B{c[0]}L{c[1]}D{c[2]}G{c[3]}K{c[4]}{'s' if c[5] else ''}seg{c[6]}"


def _block_sizes(d, groups, taps, seg, variant):
  """(forward, backward) block sizes of a variant: "default" the op's own defaults per
  direction; the others switches on the first choice (one tile, sliding windows, one store
  slot); one tile per program in a direction where two do not divide the channel tiles (D = 16)
  or do not fit shared memory."""
  x, h = (1, 64, d), (groups, taps)
  seg_of = (lambda b: b) if seg is None else (lambda b: dataclasses.replace(b, seg_chunks=seg))
  if variant == "default":
    return tuple(seg_of(fir_conv_mgpu.default_block_sizes(d // groups, taps, backward=bwd,
                                                          channels=d)) for bwd in (False, True))
  first = fir_conv_mgpu.default_block_sizes(d // groups, taps)
  bs = seg_of(MgpuBlockSizes(chunk=first.chunk, width=first.width))
  var = VARIANTS[variant]
  fwd_var, bwd_var = var if isinstance(var, tuple) else (var, var)
  bs_f = dataclasses.replace(bs, **fwd_var)
  if fir_conv_mgpu.mgpu_misfit(x, h, jnp.bfloat16, bs_f, backward=False):
    bs_f = dataclasses.replace(bs_f, tiles=1)
  bs_b = dataclasses.replace(bs, **bwd_var)
  if fir_conv_mgpu.mgpu_misfit(x, h, jnp.bfloat16, bs_f, bwd_bs=bs_b):
    bs_b = dataclasses.replace(bs_b, tiles=1)
  return bs_f, bs_b


@pytest.mark.parametrize("case,variant", VARIANT_CASES,
                         ids=[f"{_case_id(c)}-{v}" for c, v in VARIANT_CASES])
def test_forward_and_gradients(case, variant):
  x1, v, x2, dy, h, dskip = _inputs(case)
  d, groups, taps, seg = case[2], case[3], case[4], case[6]
  bs_f, bs_b = _block_sizes(d, groups, taps, seg, variant)

  def op(x1, v, x2, h, dskip):
    return gated_fir_conv_mgpu(x1, v, x2, h, dskip, interpret=INTERPRET, block_sizes=bs_f,
                               bwd_block_sizes=bs_b)

  args = (x1, v, x2, h, dskip)
  y, vjp = jax.vjp(op, *args)
  grads = vjp(dy)
  y_ref, grads_ref = numpy_gated_fir(_f32(x1), _f32(v), _f32(x2), h, dskip, _f32(dy))
  assert y.dtype == jnp.bfloat16 and y.shape == x1.shape
  assert rel_err(y, y_ref) <= TOL
  for name, g, g_ref, a in zip(("dx1", "dv", "dx2", "dh", "ddskip"), grads, grads_ref, args):
    if a is None:
      assert g is None
      continue
    assert g.shape == a.shape and g.dtype == a.dtype, name
    err = rel_err(g, g_ref)
    # ddskip sums float32 dz * u (u and dz exact products of the bf16 inputs, as the reference)
    tol = 1e-5 if name == "ddskip" else TOL
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol}"


@pytest.mark.skipif(not ON_GPU, reason="a race between warps and TMA: only a GPU has one")
def test_no_wrong_outputs_at_length_on_the_gpu():
  """The default forward at the MR geometry and 128K tokens, three calls, element by element
  against XLA: before the prologue's fence (``fir_layout_mgpu.prologue``) every call on the H200
  had 1.5K-20K wrong outputs in the first segment of the sequence (a race interpret mode cannot
  show)."""
  ks = jax.random.split(jax.random.key(0), 5)
  x1, v, x2 = (jax.random.normal(k, (1, 131072, 4096), jnp.bfloat16) for k in ks[:3])
  h = jax.random.normal(ks[3], (256, 128), jnp.float32) / np.sqrt(128)
  dskip = jax.random.normal(ks[4], (4096,), jnp.float32)
  ref = jax.jit(lambda *a: dispatch.gated_fir(*a, "xla"))(x1, v, x2, h, dskip)
  from benchmarks.fir_conv import wrong_elements  # the count the variants benchmark reports
  fn = jax.jit(gated_fir_conv_mgpu)
  counts = [int(wrong_elements(fn(x1, v, x2, h, dskip), ref)) for _ in range(3)]
  assert counts == [0, 0, 0], counts


@pytest.mark.skipif(ON_GPU, reason="the CPU (interpret-mode) path; compiled outputs start "
                    "uninitialised, not NaN")
def test_interpret_mode_poisons_outputs():
  """What the CPU tests rely on: an interpreted kernel that writes nothing leaves only NaN."""
  out = plgpu.kernel(lambda o_ref: None, out_type=jax.ShapeDtypeStruct((64, 16), jnp.bfloat16),
                     grid=(2,), grid_names=("x",), interpret=plgpu.InterpretGPUParams())()
  assert np.isnan(_f32(out)).all()


def test_dispatch_matches_xla():
  """``conv_impl='pallas_mgpu'`` through the one dispatch point agrees with ``xla``."""
  x1, v, x2, _, h, dskip = _inputs((1, 100, 32, 2, 7, True), seed=1)
  y = dispatch.gated_fir(x1, v, x2, h, dskip, "pallas_mgpu", interpret=INTERPRET)
  y_xla = dispatch.gated_fir(x1, v, x2, h, dskip, "xla")
  assert rel_err(y, y_xla) <= TOL


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((1, 64, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="take bfloat16 inputs, not float32"):
    gated_fir_conv_mgpu(*(x.astype(jnp.float32),) * 3, jnp.ones((2, 7)), interpret=True)
  x30 = jnp.ones((1, 64, 30), jnp.bfloat16)
  with pytest.raises(ValueError, match="group size 15 .* multiple of 16"):
    gated_fir_conv_mgpu(x30, x30, x30, jnp.ones((2, 7)), interpret=True)
  with pytest.raises(ValueError, match="filter length 200 exceeds 129 taps"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((2, 200)), interpret=True)
  with pytest.raises(ValueError, match="filter groups 3 do not divide channels 32"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((3, 7)), interpret=True)
  with pytest.raises(ValueError, match=r"dskip must be \[D\]"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((2, 7)), jnp.ones(5), interpret=True)
  with pytest.raises(ValueError, match="conv_impl 'pallas_mgpu' cannot run this layer: group size"):
    dispatch.gated_fir(x30, x30, x30, jnp.ones((2, 7)), None, "pallas_mgpu", interpret=True)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error path")
def test_off_gpu_is_a_clear_error():
  x = jnp.ones((1, 64, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="pass interpret=True"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="conv_impl 'pallas_mgpu' needs a GPU"):
    dispatch.gated_fir(x, x, x, jnp.ones((2, 7)), None, "pallas_mgpu")
  with pytest.raises(ValueError, match="conv_impl 'pallas_mgpu' needs a GPU"):
    dispatch.fir_fn("pallas_mgpu")
  assert dispatch.resolve_conv_impl("auto") == "xla"  # auto never picks it (not yet measured)


def test_footprint_fits_hopper_for_the_defaults():
  """The default launches of every preset's SE / MR geometry that takes these kernels fit
  Hopper's shared memory (a limit only the GPU compiler enforces), and a launch over it is
  refused by name."""
  from sh2_jax.presets import PRESETS, get_preset
  geometries = {(1024, 32, 7), (1024, 32, 128)}
  for name in PRESETS:
    cfg = get_preset(name)
    geometries |= {(cfg.d_model, cfg.se_groups, cfg.se_len), (cfg.d_model, cfg.mr_groups,
                                                               cfg.mr_len)}
  assert (8192, 512, 128) in geometries  # the 20B / 40B MR layers
  for d, g, k in sorted(geometries):
    if (d // g) % 16:
      continue  # Evo 2 1B's 15 channels per group: the Triton kernels (dispatch.fir_choice)
    assert fir_conv_mgpu.mgpu_misfit((1, 1024, d), (g, k), jnp.bfloat16) is None, (d, g, k)
  too_big = MgpuBlockSizes(chunk=128, width=128)
  x = jnp.ones((1, 64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="bytes of shared memory"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((1, 7)), interpret=True, block_sizes=too_big)
  with pytest.raises(ValueError, match="tiles=3 does not divide the 8 channel tiles of width 16"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((1, 7)), interpret=True,
                        block_sizes=MgpuBlockSizes(tiles=3))
  with pytest.raises(ValueError, match="store_slots 3 is not 1 or 2"):
    gated_fir_conv_mgpu(x, x, x, jnp.ones((1, 7)), interpret=True,
                        block_sizes=MgpuBlockSizes(store_slots=3))
  # the backward's own block sizes are the ones its check (and kernel) takes
  bad_bwd = lambda x: gated_fir_conv_mgpu(x, x, x, jnp.ones((1, 7)), interpret=True,
                                          bwd_block_sizes=MgpuBlockSizes(tiles=3)).sum()
  with pytest.raises(ValueError, match="cannot differentiate this layer: tiles=3 does not"):
    jax.grad(bad_bwd)(x)


LOWERING = [(256, 7, "default"), (256, 128, "default"), (64, 7, "default"),
            (32, 128, "default")] + [(g, k, v) for g, k in ((256, 7), (256, 128))
                                     for v in ("ring", "slots2", "tiles2", "wide", "narrow",
                                               "all", "split")]


def _lower(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("groups,taps,variant", LOWERING,
                         ids=[f"G{g}K{k}-{v}" for g, k, v in LOWERING])
def test_lowers_for_hopper(groups, taps, variant):
  """The kernels lower to Mosaic GPU for a CUDA device from this (CPU) host: layout inference,
  wgmma operand swizzles and TMA transfers are checked here, which interpret mode does not do.
  Only the final PTX compile (and register limits) needs the GPU."""
  x = jax.ShapeDtypeStruct((1, 4096, 4096), jnp.bfloat16)
  h = jax.ShapeDtypeStruct((groups, taps), jnp.float32)
  dskip = jax.ShapeDtypeStruct((4096,), jnp.float32)
  bs_f, bs_b = _block_sizes(4096, groups, taps, None, variant)
  assert fir_conv_mgpu.mgpu_misfit(x.shape, h.shape, x.dtype, bs_f, bwd_bs=bs_b) is None
  for text in (_lower(lambda x1, v, x2, h, d: fir_conv_mgpu.fwd(x1, v, x2, h, d, bs_f),
                      x, x, x, h, dskip),
               _lower(lambda x1, v, x2, h, d, dy: fir_conv_mgpu.bwd(x1, v, x2, h, d, dy, bs_b),
                      x, x, x, h, dskip, x)):
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("taps", [7, 128])
def test_smem_estimate_matches_the_lowering(taps, monkeypatch):
  """``smem_bytes`` (what ``mgpu_misfit`` refuses launches by) is what the lowering allocates,
  up to its barriers: the lowering's own limit is lowered to 1 byte so that its error names the
  size it computed (its only way of telling)."""
  from jax.experimental.mosaic.gpu import core as mosaic_core
  monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 1)
  x = jax.ShapeDtypeStruct((1, 1024, 4096), jnp.bfloat16)
  h = jax.ShapeDtypeStruct((256, taps), jnp.float32)
  dskip = jax.ShapeDtypeStruct((4096,), jnp.float32)
  for variant in ("default", "all", "narrow"):
    bs_f, bs_b = _block_sizes(4096, 256, taps, None, variant)
    for backward, bs, fn, args in (
        (False, bs_f, lambda x1, v, x2, h, d: fir_conv_mgpu.fwd(x1, v, x2, h, d, bs_f),
         (x, x, x, h, dskip)),
        (True, bs_b, lambda x1, v, x2, h, d, dy: fir_conv_mgpu.bwd(x1, v, x2, h, d, dy, bs_b),
         (x, x, x, h, dskip, x))):
      with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        _lower(fn, *args)
      lowered = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
      estimate = fir_conv_mgpu.smem_bytes(bs, taps, backward)
      assert estimate <= lowered <= estimate + 1024, (variant, backward, estimate, lowered)


def test_variants_benchmark_refuses_unknown_names():
  """``benchmarks/fir_conv.py --mode mgpu_variants --only`` with a name it does not know: one
  error line naming it and the valid ones, exit code 2, before any timing."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "fir_conv.py"),
                         "--mode", "mgpu_variants", "--only", "default,fastest"],
                        capture_output=True, text=True, timeout=300, cwd=root)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith("error: --only 'fastest' names no variant; expected some of "
                                "default, first, ring,")
