"""Parameter counts and FLOPs per token, from the config alone (no weights allocated).

A multiply-add counts 2. Forward, per token: 2 x (matrix parameters) for the projections, MLPs
and the tied unembedding; featurizer 2 x 3 x 3D; SE / MR inner filters 2 K D; LI's FFT
convolution about 30 log2(2L) D (three real FFTs of size 2L at ~5 N log2 N flops each, per 2L
positions... per token that is ~3 x 5 log2(2L) x 2); causal attention 2 x 2 x (L/2) x D
(scores and values over half the square). Training = 3 x forward.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from sh2_jax.config import ModelConfig


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, by abstract evaluation (works for 40B on a laptop)."""
  abstract = _abstract(cfg)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _abstract(cfg: ModelConfig):
  from sh2_jax.model import StripedHyena  # local: the model imports nothing from here
  return nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))


def layer_flops(cfg: ModelConfig, seq_len: int) -> list[float]:
  """Forward FLOPs per token of each block (each block counts its own mixer)."""
  return [block.flops_per_token(cfg, seq_len) for block in _abstract(cfg).blocks]


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token at sequence length ``seq_len`` (x3 for forward + backward)."""
  fwd = sum(layer_flops(cfg, seq_len))
  fwd += 2 * cfg.d_model * cfg.vocab_size  # tied unembedding
  return 3 * fwd if training else fwd
