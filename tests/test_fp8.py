"""FP8 (E4M3) projections: quantisation against an independent computation, TE extra state."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml

from sh2_jax import fp8
from sh2_jax.convert.torch_pickle import load_state_dict, read_extra_state
from sh2_jax.convert.vortex import build_model, config_from_yaml, fp8_mode_for, params_from_state_dict
from sh2_jax.embed import embed

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

# Every finite E4M3FN value, from its bit patterns (independent of any cast routine).
_ALL = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
GRID = np.unique(_ALL[np.isfinite(_ALL)])


def reference_quantize(x, scale):
  """Saturate to +-448, then round to the nearest grid value, ties to the even mantissa."""
  # The scaling multiply happens in float32, as in the model; the rest is exact.
  y = (np.asarray(x, np.float32) * np.float32(scale)).astype(np.float64)
  y = np.clip(y, -448.0, 448.0)
  idx = np.clip(np.searchsorted(GRID, y), 1, len(GRID) - 1)
  lo, hi = GRID[idx - 1], GRID[idx]
  pick_hi = (hi - y) < (y - lo)
  tie = (hi - y) == (y - lo)
  hi_even = (np.array([GRID[i] for i in idx]).astype(ml_dtypes.float8_e4m3fn)
             .view(np.uint8) & 1) == 0
  return np.where(pick_hi | (tie & hi_even), hi, lo)


def test_quantize_matches_independent_rounding():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal(4000) * 3, rng.uniform(-600, 600, 1000),
                      [0.0, 448.0, -448.0, 449.0, 1e6, -1e6, 1e-12],
                      (GRID[1:] + GRID[:-1]) / 2]).astype(np.float32)  # exact ties at scale 1
  for scale in (1.0, 7.0, 0.37):
    got = np.asarray(fp8.quantize_e4m3(jnp.asarray(x), scale).astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(got, reference_quantize(x, scale))
  sat = np.asarray(fp8.quantize_e4m3(jnp.asarray([1e6, -1e6]), 1.0).astype(jnp.float32))
  np.testing.assert_array_equal(sat, [448.0, -448.0])  # saturates, never NaN


def test_scales_and_matmul():
  np.testing.assert_allclose(np.asarray(fp8.scale_from_amax(jnp.asarray([2.0, 0.0, np.inf]))),
                             [224.0, 1.0, 1.0])
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 5, 16)).astype(np.float32)
  w = (rng.standard_normal((16, 8)) * 0.1).astype(np.float32)
  s = np.array([448 / np.abs(x).max(), 448 / np.abs(w).max()], np.float32)
  y = fp8.fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s))
  ref = reference_quantize(x, s[0]) @ reference_quantize(w, s[1]) / (float(s[0]) * float(s[1]))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
  cs = np.asarray(fp8.current_scales(jnp.asarray(x), jnp.asarray(w)))
  np.testing.assert_allclose(cs, s, rtol=1e-6)
  # Straight-through gradient: that of the unquantised GEMM.
  gx = jax.grad(lambda a: fp8.fp8_matmul(a, jnp.asarray(w), jnp.asarray(s)).sum())(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(gx), np.broadcast_to(w.sum(1), x.shape), rtol=1e-5)


@pytest.fixture(scope="module")
def fp8_model():
  sd = dict(load_state_dict(os.path.join(FIX, "vortex_tiny", "state_dict.pt")))
  extra = load_state_dict(os.path.join(FIX, "te_fp8", "extra_state.pt"))
  sd.update(extra)
  ycfg = yaml.safe_load(open(os.path.join(FIX, "vortex_tiny", "config.yml")))
  ycfg["use_fp8_input_projections"] = True
  mode = fp8_mode_for(ycfg["use_fp8_input_projections"], sd)
  cfg = config_from_yaml(ycfg, fp8_projections=mode)
  return build_model(cfg, params_from_state_dict(sd, cfg)), extra


def test_checkpoint_scales_from_te_extra_state(fp8_model):
  model, extra = fp8_model
  assert model.cfg.fp8_projections == "checkpoint_scales"
  state = read_extra_state(extra["blocks.1.projections._extra_state"].getvalue())
  scales = np.asarray(state["scale_fwd"])[:2]
  np.testing.assert_array_equal(np.asarray(model.blocks[1].projections.fp8_scales[...]), scales)
  tokens = np.load(os.path.join(FIX, "vortex_tiny", "inputs.npz"))["tokens"][:, :64]
  acts = embed(model, tokens, ["blocks.1.pre_norm", "blocks.1.projections"])
  x = np.asarray(acts["blocks.1.pre_norm"])
  w = np.asarray(model.blocks[1].projections.kernel[...])
  ref = reference_quantize(x, scales[0]) @ reference_quantize(w, scales[1]) / (
      float(scales[0]) * float(scales[1]))
  np.testing.assert_allclose(np.asarray(acts["blocks.1.projections"]), ref, rtol=1e-5, atol=1e-5)
  # FP8 changes the logits, but only by quantisation noise.
  ref_logits = np.load(os.path.join(FIX, "vortex_tiny", "logits.npz"))["logits"][:, :64]
  out = np.asarray(model(jnp.asarray(tokens)))
  err = np.linalg.norm(out - ref_logits) / np.linalg.norm(ref_logits)
  assert 1e-4 < err < 0.3


def test_missing_scales_are_reported():
  sd = dict(load_state_dict(os.path.join(FIX, "vortex_tiny_parts", "state_dict.pt")))
  ycfg = yaml.safe_load(open(os.path.join(FIX, "vortex_tiny_parts", "config.yml")))
  ycfg["use_fp8_input_projections"] = True
  # dummy blobs hold no scales (logged)
  assert fp8_mode_for(ycfg["use_fp8_input_projections"], sd) == "current_scaling"
  cfg = config_from_yaml(ycfg, fp8_projections="checkpoint_scales")
  with pytest.raises(ValueError, match="needs FP8 scales in blocks.0.projections._extra_state"):
    params_from_state_dict(sd, cfg)
  with pytest.raises(ValueError, match="fp8_projections 'e5m2' is not valid"):
    config_from_yaml(ycfg, fp8_projections="e5m2")
