"""The residual blocks: ``z = u + mix(pre_norm(u))``, ``y = z + mlp(post_norm(z))``.

One call for every mode (``sh2_jax.modes``): ``block(u, mode, cache) -> (y, cache)``. The
residual is written once (``_ResidualBlock``); a block differs only in its mixer:
``HyenaBlock.mix`` (projections -> filter -> out_filter_dense, the filter an SE/MR
``FirFilter`` or an LI ``ModalFilter``) or ``AttentionBlock.mix`` (``inner_mha_cls``). Module
paths follow the reference checkpoint (``pre_norm``, ``post_norm``, ``projections``,
``filter``, ``out_filter_dense``, ``inner_mha_cls``, ``mlp``). ``make_block`` is the one place
that maps a layer type to its classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sh2_jax import capture
from sh2_jax.attention import Attention
from sh2_jax.config import ModelConfig
from sh2_jax.hyena import FirFilter, ModalFilter
from sh2_jax.layers import MLP, Dense, RMSNorm, small_init, wang_init
from sh2_jax.modes import FULL


def norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm:
  return RMSNorm(cfg.d_model, eps=cfg.eps, dtype=jnp.dtype(cfg.dtype),
                 param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _mlp(index: int, cfg: ModelConfig, rngs: nnx.Rngs) -> MLP:
  if cfg.evo2_style_activations:
    activation = "gelu" if index == 0 else "identity"
  else:
    activation = cfg.mlp_activation
  return MLP(cfg.d_model, cfg.mlp_hidden, activation=activation, num_layers=cfg.num_layers,
             dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class _ResidualBlock(nnx.Module):
  """The pre-norm residual around a mixer and the MLP; subclasses define ``mix`` and
  ``mixer_flops_per_token``."""

  def flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token (a multiply-add counts 2): the mixer plus the gated MLP."""
    return self.mixer_flops_per_token(cfg, seq_len) + 2 * 3 * cfg.d_model * cfg.mlp_hidden

  def __call__(self, u: jax.Array, mode=FULL, cache=None):
    """u [B, L, D] -> (y [B, L, D], the mixer's new cache or None)."""
    mixed, cache = self.mix(self.pre_norm(u), mode, cache)
    z = u + mixed
    return capture.record(self, z + self.mlp(self.post_norm(z))), cache


class HyenaBlock(_ResidualBlock):
  """SE, MR or LI block: the Hyena operator as the mixer. ``filter_cls(cfg, rngs)`` builds the
  inner filter (``FirFilter.se``, ``FirFilter.mr`` or ``ModalFilter``)."""

  def __init__(self, index: int, filter_cls, cfg: ModelConfig, rngs: nnx.Rngs):
    d, dt, pdt = cfg.d_model, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.pre_norm = norm(cfg, rngs)
    self.post_norm = norm(cfg, rngs)
    self.projections = Dense(d, 3 * d, use_bias=False, init=small_init(d), dtype=dt,
                             param_dtype=pdt, rngs=rngs, fp8=cfg.fp8_projections)
    self.filter = filter_cls(cfg, rngs)
    self.out_filter_dense = Dense(d, d, use_bias=cfg.hyena_out_bias,
                                  init=wang_init(d, cfg.num_layers), dtype=dt, param_dtype=pdt,
                                  rngs=rngs)
    self.mlp = _mlp(index, cfg, rngs)

  def mix(self, x: jax.Array, mode=FULL, cache=None):
    """The Hyena operator: x [B, L, D] -> (y [B, L, D], HyenaCache or None)."""
    y, cache = self.filter(self.projections(x), mode, cache)
    return self.out_filter_dense(y), cache

  def init_cache(self, batch: int, max_len: int):
    return self.filter.init_cache(batch, max_len)

  def mixer_flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
    d = cfg.d_model
    return 2 * (3 * d * d + d * d) + self.filter.flops_per_token(seq_len)


class AttentionBlock(_ResidualBlock):
  """MHA block: ``inner_mha_cls`` as the mixer."""

  def __init__(self, index: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.pre_norm = norm(cfg, rngs)
    self.post_norm = norm(cfg, rngs)
    self.inner_mha_cls = Attention(cfg, rngs)
    self.mlp = _mlp(index, cfg, rngs)

  def mix(self, x: jax.Array, mode=FULL, cache=None):
    return self.inner_mha_cls(x, mode, cache)

  def init_cache(self, batch: int, max_len: int):
    return self.inner_mha_cls.init_cache(batch, max_len)

  def mixer_flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
    d = cfg.d_model  # projections, and causal attention over half the square
    return 2 * (3 * d * d + d * d) + 2 * 2 * (seq_len / 2) * d


def make_block(index: int, op: str, cfg: ModelConfig, rngs: nnx.Rngs):
  """The block of layer type ``op`` (``SE``, ``MR``, ``LI``, ``MHA``) at position ``index``."""
  if op == "MHA":
    return AttentionBlock(index, cfg, rngs)
  filters = {"SE": FirFilter.se, "MR": FirFilter.mr, "LI": ModalFilter}
  if op not in filters:
    raise ValueError(f"layer type {op!r} is not one of SE, MR, LI, MHA")
  return HyenaBlock(index, filters[op], cfg, rngs)
