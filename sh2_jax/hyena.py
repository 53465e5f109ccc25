"""The Hyena operator (SE, MR, LI share everything but the inner filter).

x: [B, L, D] -> [B, L, D]:
  z = projections(x)                  [B, L, 3D], no bias
  zc = featurizer(z)                  depthwise causal 3-tap FIR (checkpoint: cross-correlation)
  x2, x1, v = zc[..., 0::3], zc[..., 1::3], zc[..., 2::3]
  y = x2 * (inner(x1 * v) [+ D * x1 * v])
  out = out_filter_dense(y)           D -> D with bias
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import capture, conv, dispatch
from sh2_jax.config import ModelConfig
from sh2_jax.layers import Dense, param


class HyenaFilter(nnx.Module):
  """The featurizer weights and the inner filter of one Hyena layer (module path ``filter``).

  Parameters, in the reference checkpoint's orientation:
    short_filter_weight [3D, 3]   featurizer, cross-correlation (last tap = current token)
    SE: h [G, 7]                  cross-correlation (h[:, -1] = current token)
    MR: h [G, 128], D [D]         true convolution; times the live decay during training
    LI: log_rates [D, N], residues [D, N], D [D]   poles lambda = -exp(log_rates)
  """

  def __init__(self, op: str, cfg: ModelConfig, rngs: nnx.Rngs):
    d, pdt = cfg.d_model, jnp.dtype(cfg.param_dtype)
    self.op = op
    self.cfg = cfg
    k = cfg.featurizer_len
    self.short_filter_weight = param(
        rngs, jax.nn.initializers.uniform(2 / math.sqrt(k)), (3 * d, k), pdt, ("fsdp", None))
    self.short_filter_weight[...] = self.short_filter_weight[...] - 1 / math.sqrt(k)
    if op == "SE":
      self.h = param(rngs, jax.nn.initializers.normal(1 / math.sqrt(cfg.se_len)),
                     (cfg.se_groups, cfg.se_len), pdt, (None, None))
    elif op == "MR":
      self.h = param(rngs, jax.nn.initializers.normal(1 / math.sqrt(cfg.mr_len)),
                     (cfg.mr_groups, cfg.mr_len), pdt, (None, None))
    elif op == "LI":
      n = cfg.li_state
      rates = np.logspace(-4, 0, n, dtype=np.float32)  # timescales 1 .. 1e4 tokens
      self.log_rates = nnx.Param(jnp.tile(jnp.log(rates), (d, 1)).astype(pdt),
                                 out_sharding=("fsdp", None), eager_sharding=False)
      r = jax.random.normal(rngs.params(), (d, n), jnp.float32) * jnp.sqrt(2 * rates) / 4
      self.residues = nnx.Param(r.astype(pdt), out_sharding=("fsdp", None), eager_sharding=False)
    else:
      raise ValueError(f"HyenaFilter op {op!r} is not one of SE, MR, LI")
    self.D = (param(rngs, jax.nn.initializers.ones, (d,), pdt, (None,))
              if op in ("MR", "LI") else None)

  # -- filters in true-convolution orientation: the one place the orientation is decided --
  def featurizer_taps(self) -> jax.Array:
    """[3D, 3], h[:, 0] = current token."""
    return jnp.flip(self.short_filter_weight[...], axis=1)

  def fir_taps(self) -> jax.Array:
    """SE/MR grouped filter [G, K], h[:, 0] = current token (MR decay applied)."""
    if self.op == "SE":
      return jnp.flip(self.h[...], axis=1)
    decay = conv.mr_decay(self.cfg.mr_groups, self.cfg.mr_len, self.cfg.mr_decay,
                          self.cfg.mr_decay_length or None)
    return self.h[...] * decay

  def log_poles(self) -> jax.Array:
    """LI poles lambda [D, N] (negative), float32."""
    return -jnp.exp(self.log_rates[...].astype(jnp.float32))

  def __call__(self, x1, v, x2):
    dskip = None if self.D is None else self.D[...]
    if self.op == "LI":
      y = dispatch.gated_modal(x1, v, x2, self.log_poles(), self.residues[...], dskip,
                               self.cfg.li_impl)
    else:
      y = dispatch.gated_fir(x1, v, x2, self.fir_taps(), dskip, self.cfg.conv_impl)
    return capture.record(self, y)


def featurize(z: jax.Array, taps: jax.Array):
  """Featurizer + interleaved split: z [B, L, 3D] -> (x2, x1, v), each [B, L, D]."""
  zc = conv.featurizer_conv(z, taps)
  return conv.interleaved_split(zc)


def hyena_forward(projections: Dense, filt: HyenaFilter, out_filter_dense: Dense,
                  x: jax.Array) -> jax.Array:
  """x [B, L, D] -> [B, L, D] through the whole Hyena operator."""
  z = projections(x)
  x2, x1, v = featurize(z, filt.featurizer_taps())
  return out_filter_dense(filt(x1, v, x2))
