"""Small building blocks: parameters with sharding names, Dense, RMSNorm, the gated MLP.

Parameters are created in ``param_dtype`` (float32 by default) and cast to the compute dtype at
use. Every parameter carries mesh-axis names (``fsdp`` on the first axis of matrices) that the
trainer turns into shardings; nothing here needs a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sh2_jax import capture
from sh2_jax import fp8 as fp8lib


def param(rngs: nnx.Rngs, init, shape, dtype, sharding) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=sharding, eager_sharding=False)


def small_init(dim: int):
  """Normal with std sqrt(2 / (5 D)) (the GPT-NeoX / savanna "small init")."""
  return jax.nn.initializers.normal(math.sqrt(2.0 / (5.0 * dim)))


def wang_init(dim: int, num_layers: int):
  """Normal with std 2 / (num_layers sqrt(D)) for the projections that write the residual."""
  return jax.nn.initializers.normal(2.0 / (max(num_layers, 1) * math.sqrt(dim)))


class Dense(nnx.Module):
  """y = x @ kernel (+ bias). kernel: [in, out]. ``fp8`` runs the GEMM through E4M3 as the
  FP8 recipe of ``sh2_jax.fp8`` does (``off`` | ``checkpoint_scales`` | ``current_scaling``)."""

  def __init__(self, d_in: int, d_out: int, *, use_bias: bool, init, dtype, param_dtype,
               rngs: nnx.Rngs, fp8: str = "off"):
    self.kernel = param(rngs, init, (d_in, d_out), param_dtype, ("fsdp", None))
    self.bias = (param(rngs, jax.nn.initializers.zeros, (d_out,), param_dtype, (None,))
                 if use_bias else None)
    self.dtype = dtype
    if fp8 not in fp8lib.FP8_MODES:
      raise ValueError(f"fp8 mode {fp8!r} is not one of {', '.join(fp8lib.FP8_MODES)}")
    self.fp8 = fp8
    self.fp8_scales = (fp8lib.Fp8Scales(jnp.ones((2,), jnp.float32), out_sharding=(None,),
                                        eager_sharding=False)
                       if fp8 == "checkpoint_scales" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if self.fp8 == "off":
      # Output in the compute dtype (GPU GEMMs accumulate in float32 and round once): the
      # backward GEMMs then take compute-dtype cotangents. A float32 output here made the
      # cotangent float32 and both backward GEMMs float32 (TF32 on Hopper, half the bf16 rate).
      y = jnp.dot(x, kernel, preferred_element_type=self.dtype)
    else:
      scales = (jax.lax.stop_gradient(self.fp8_scales[...]) if self.fp8_scales is not None
                else fp8lib.current_scales(x, kernel))
      y = fp8lib.fp8_matmul(x, kernel, scales)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return capture.record(self, y.astype(self.dtype))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """``scale * x / (||x||_2 D^-1/2 + eps)`` in float32 (eps outside the square root)."""
  xf = x.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True))
  return scale.astype(jnp.float32) * (xf / (rms + eps))


class RMSNorm(nnx.Module):
  """RMSNorm as in the reference: eps is added to the RMS. x: [..., D] -> [..., D]."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, (None,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return capture.record(self, rms_norm(x, self.scale[...], self.eps).astype(self.dtype))


def gelu_erf(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
  """Gated MLP without biases: ``l3(act(l1 x) * l2 x)``; act is erf-GELU or identity."""

  def __init__(self, dim: int, hidden: int, *, activation: str, num_layers: int, dtype,
               param_dtype, rngs: nnx.Rngs):
    if activation not in ("gelu", "identity"):
      raise ValueError(f"MLP activation {activation!r} is not one of 'gelu', 'identity'")
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.l1 = Dense(dim, hidden, init=small_init(dim), **kw)
    self.l2 = Dense(dim, hidden, init=small_init(dim), **kw)
    self.l3 = Dense(hidden, dim, init=wang_init(dim, num_layers), **kw)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.l1(x)
    if self.activation == "gelu":
      a = gelu_erf(a.astype(jnp.float32)).astype(a.dtype)
    return capture.record(self, self.l3(a * self.l2(x)))
