"""Shared by the scoring and variant tests: a small model with every layer kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sh2_jax import ModelConfig, StripedHyena


def small_model(seed: int = 0, **kw) -> StripedHyena:
  """Every layer kind, O(1) random weights (the default init leaves the blocks nearly silent,
  which would let a padding or batching bug hide behind the residual stream)."""
  cfg = ModelConfig(d_model=24, num_layers=4, layout="SE-MR-LI-MHA", num_heads=2,
                    mlp_hidden=40, se_groups=4, mr_groups=3, mr_len=20, max_seqlen=256, **kw)
  return perturb_params(StripedHyena(cfg, rngs=nnx.Rngs(seed)), seed)


def perturb_params(model: StripedHyena, seed: int) -> StripedHyena:
  """Every parameter plus O(1) noise (0.5 / sqrt(fan-in) for matrices, 0.3 otherwise), the LI
  poles kept; in place, returned."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)

  def perturb(path, x):
    if str(path[-1].key) == "log_rates":  # keep the LI poles stable
      return x
    scale = 0.5 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.3
    return jnp.asarray(np.asarray(x) + rng.normal(size=x.shape) * scale, x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(perturb,
                                                                   nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def model():
  """``small_model()``, shared by a test module."""
  return small_model()
