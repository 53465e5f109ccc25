"""Causality: no output position may depend on a later input, for every operator implementation,
the whole model and the context-parallel forward.

A perturbation of the input at position p must leave every output before p unchanged (up to
float32 round-off of reordered sums) and change the output at p. On CPU the Pallas kernels run
in the interpreter at small shapes; on a GPU (``pytest tests/test_causality.py`` there) the same
tests run the compiled kernels at long shapes, where a block-boundary defect that the small
interpreted shapes cannot reach would show, and also compare each kernel against the XLA
reference at that shape.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sh2_jax import ModelConfig, StripedHyena, dispatch

GPU = jax.default_backend() == "gpu"
# (length, channels, groups): lengths not a multiple of any chunk; long on GPU
OP_SHAPE = (16384 + 37, 4096, 256) if GPU else (203, 32, 4)  # GPU: the 7B width
# bf16 takes other kernel block sizes than float32 (sh2_jax/kernels/fir_layout.py); on CPU the
# interpreter runs the same code for both, so float32 only
DTYPES = [jnp.float32, jnp.bfloat16] if GPU else [jnp.float32]
MODEL_LEN = 8192 + 21 if GPU else 77
MODEL_DTYPES = ["float32", "bfloat16"] if GPU else ["float32"]


def probe_positions(length):
  """Chunk boundaries of every kernel (16..256) and their neighbours, the first and last token."""
  ps = {1, length - 1, length // 2}
  for c in (16, 32, 64, 128, 256):
    for k in (1, 3):
      ps.update({k * c - 1, k * c, k * c + 1})
  return sorted(p for p in ps if 0 < p < length)


def assert_causal(fn, x, positions, axis=1, what=""):
  """fn(x) -> y with the sequence on ``axis`` of both; perturb x at each position. The
  per-position change is reduced on the device (long GPU shapes move only [L] to the host)."""
  fn = jax.jit(fn)
  base = fn(x).astype(jnp.float32)
  scale = float(jnp.abs(base).max())

  @jax.jit
  def change(y):
    d = jnp.moveaxis(jnp.abs(y.astype(jnp.float32) - base), axis, 0)
    return d.reshape(d.shape[0], -1).max(axis=1)

  for p in positions:
    idx = (slice(None),) * axis + (p,)
    if jnp.issubdtype(x.dtype, jnp.floating):
      x2 = x.at[idx].add(1.0)
    else:
      x2 = x.at[idx].set((x[idx] + 7) % 256)
    d = np.asarray(change(fn(x2)))
    assert d[:p].max(initial=0.0) <= 1e-5 * scale, (
        f"{what}: output before position {p} changed by {d[:p].max():.3g} "
        f"(first at {int(np.argmax(d[:p] > 1e-5 * scale))}; scale {scale:.3g})")
    assert d[p] > 1e-5 * scale, f"{what}: output at {p} did not change"


def op_inputs(seed=0, dtype=jnp.float32):
  length, d, groups = OP_SHAPE
  ks = jax.random.split(jax.random.key(seed), 6)
  x1, v, x2 = (jax.random.normal(k, (2, length, d), dtype) for k in ks[:3])
  return length, d, groups, ks, x1, v, x2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("taps", [7, 128])
@pytest.mark.parametrize("impl", ["pallas", "xla", "fft"])
def test_fir_causal(impl, taps, dtype):
  if dtype != jnp.float32 and impl != "pallas":
    pytest.skip("bf16 rounding of the reordered float32 sums of xla/fft can flip an ulp")
  length, d, groups, ks, x1, v, x2 = op_inputs(0, dtype)
  h = jax.random.normal(ks[3], (groups, taps)) / np.sqrt(taps)
  dskip = jax.random.normal(ks[4], (d,))
  fn = lambda a: dispatch.gated_fir(x1, a, x2, h, dskip, impl, interpret=not GPU)
  assert_causal(fn, v, probe_positions(length), what=f"gated_fir {impl} K={taps}")
  if GPU and impl == "pallas":  # the compiled kernel against the reference at this shape
    f32 = lambda a: a.astype(jnp.float32)
    ref = dispatch.gated_fir(f32(x1), f32(v), f32(x2), h, dskip, "xla")
    assert rel(fn(v), ref) < (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["modal_scan", "modal_serial", "modal_fast", "fft"])
def test_modal_causal(impl, dtype):
  if dtype != jnp.float32 and impl == "fft":
    pytest.skip("bf16 rounding of the FFT's float32 round-off can flip an ulp")
  length, d, _, ks, x1, v, x2 = op_inputs(1, dtype)
  log_poles = -jnp.exp(jax.random.uniform(ks[3], (d, 16), minval=-6.0, maxval=0.0))
  residues = jax.random.normal(ks[4], (d, 16)) * 0.1
  dskip = jax.random.normal(ks[5], (d,))
  fn = lambda a: dispatch.gated_modal(x1, a, x2, log_poles, residues, dskip, impl,
                                      interpret=not GPU)
  assert_causal(fn, v, probe_positions(length), what=f"gated_modal {impl}")
  if GPU and impl != "fft":
    f32 = lambda a: a.astype(jnp.float32)
    ref = dispatch.gated_modal(f32(x1), f32(v), f32(x2), log_poles, residues, dskip, "fft")
    assert rel(fn(v), ref) < (1e-4 if dtype == jnp.float32 else 1e-2)


def rel(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def small_model(**kw):
  d, groups = (256, 16) if GPU else (32, 4)
  cfg = ModelConfig(d_model=d, num_layers=7, layout="SE-MR-LI-MHA-SE-MR-LI", num_heads=2,
                    mlp_hidden=2 * d, se_groups=groups, mr_groups=groups,
                    max_seqlen=MODEL_LEN + 64, **kw)
  return StripedHyena(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_model_causal(dtype):
  """The default implementations (compiled Pallas + cuDNN on GPU)."""
  model = small_model(dtype=dtype)
  tokens = jax.random.randint(jax.random.key(1), (1, MODEL_LEN), 0, 256)
  assert_causal(model, tokens, probe_positions(MODEL_LEN)[::3], what="model (auto impls)")


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_context_parallel_causal(dtype):
  """The zig-zag context-parallel forward in two mode sets, on the largest power-of-two number
  of devices (4 forced host devices on CPU)."""
  from sh2_jax.train import mesh as mesh_lib
  from sh2_jax.train.step import forward
  n = jax.device_count()
  if n < 2:  # one CPU device: rerun this test in a process with 4 forced host devices
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", "test_context_parallel_causal"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return
  n = 1 << (n.bit_length() - 1)
  mesh = jax.make_mesh((1, 1, n), mesh_lib.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=jax.devices()[:n])
  model = small_model(dtype=dtype)
  length = (MODEL_LEN // (2 * n)) * 2 * n
  tokens = jax.random.randint(jax.random.key(2), (1, length), 0, 256)
  for modes in (dict(mr_mode="p2p", li_mode="a2a", attention_mode="allgather"),
                dict(mr_mode="a2a", li_mode="state", attention_mode="ring")):
    assert_causal(lambda t, m=modes: forward(model, t, "none", mesh, m), tokens,
                  probe_positions(length)[::4], what=f"context {n} {modes}")
