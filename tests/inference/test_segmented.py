"""The segmented (streamed) forward equals the one-shot forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax.inference.segmented import segmented_logits, segmented_score


def rel(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


@pytest.mark.parametrize("layout,segment", [("SE-MR-LI-MHA", 13), ("LI-MHA", 40), ("MR-SE", 5)])
def test_segmented_equals_one_shot(layout, segment):
  cfg = sh2_jax.ModelConfig(d_model=32, num_layers=4, layout=layout, num_heads=2, mlp_hidden=48,
                            se_groups=4, mr_groups=8, mr_len=24)
  model = sh2_jax.StripedHyena(cfg, rngs=nnx.Rngs(1))
  tokens = np.random.default_rng(2).integers(0, 256, (2, 157)).astype(np.int32)
  ref = np.asarray(model(jnp.asarray(tokens)))
  out = segmented_logits(model, tokens, segment)   # many segments, the last one partial
  assert out.shape == ref.shape
  assert rel(out, ref) <= 1e-5
  ll = segmented_score(model, tokens, segment)
  np.testing.assert_allclose(ll, np.asarray(sh2_jax.score(model, jnp.asarray(tokens))),
                             rtol=1e-5, atol=2e-5)


def test_bad_segment_len():
  model = sh2_jax.StripedHyena(sh2_jax.ModelConfig(num_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="segment_len 0 must be a positive integer"):
    segmented_logits(model, np.zeros((1, 8), np.int32), 0)


def test_segment_step_updates_the_kv_cache_in_place():
  """The donated KV cache is written in place: no copy of a cache-shaped buffer in the
  compiled segment step (reading the cache before writing it made XLA copy it every segment)."""
  from sh2_jax.inference import segmented as sg
  from sh2_jax.inference.cache import init_cache
  cfg = sh2_jax.ModelConfig(d_model=32, num_layers=2, layout="SE-MHA", num_heads=2, mlp_hidden=48,
                            se_groups=4)
  graphdef, state = nnx.split(sh2_jax.StripedHyena(cfg, rngs=nnx.Rngs(0)))
  cache = init_cache(cfg, 1, 4099)
  step = sg._segment_step.lower(graphdef, state, cache, jnp.zeros((1, 64), jnp.int32),
                                jnp.zeros((1,), jnp.int32), sg._loglik_head, None).compile()
  shape = "f32[1,4099,2,16]"
  lines = [ln for ln in step.as_text().splitlines() if shape in ln]
  assert any("dynamic-update-slice" in ln for ln in lines)  # the pattern does find the cache
  assert not [ln for ln in lines if " copy(" in ln], [ln for ln in lines if " copy(" in ln]
