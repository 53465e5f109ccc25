"""FP8 (E4M3) input projections as Transformer Engine's delayed-scaling recipe computes them.

The Evo 2 1B / 20B / 40B checkpoints were trained with the Hyena ``projections`` GEMM in FP8
(``DelayedScaling``, ``Format.HYBRID``: E4M3 in the forward pass, ``amax_history_len=16``,
``amax_compute_algo='max'``, margin 0). Per tensor (input and weight separately):

  scale = E4M3_MAX / amax                       (amax = max of the amax history, or of the
                                                 tensor itself under current scaling)
  q     = saturate_e4m3(x * scale)              (round to nearest even, clipped to +-448)
  y     = (q_x @ q_w^T) / (scale_x * scale_w)   (float32 accumulation)

Here the product of E4M3 values is formed exactly in float32 on any backend (emulation); the
gradient is straight-through (as if unquantised). Modes (``ModelConfig.fp8_projections``):
``off``; ``checkpoint_scales`` — the scales come from the checkpoint's ``_extra_state`` (held in
``Fp8Scales`` variables and never trained); ``current_scaling`` — amax of the current tensors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax.config import FP8_MODES

E4M3_MAX = 448.0


class Fp8Scales(nnx.Param):
  """[2] float32: the forward scales of (input, weight). A Param subclass so checkpoints carry
  it; optimizers skip it (``nnx.Not(Fp8Scales)``) and the forward stops its gradient."""


def scale_from_amax(amax: jax.Array, margin: int = 0) -> jax.Array:
  """``E4M3_MAX / amax / 2^margin``; 1 where amax is 0 or not finite (TE keeps such scales)."""
  amax = jnp.asarray(amax, jnp.float32)
  ok = jnp.isfinite(amax) & (amax > 0)
  return jnp.where(ok, E4M3_MAX / jnp.where(ok, amax, 1.0) / 2.0**margin, 1.0)


def quantize_e4m3(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Saturating cast of ``x * scale`` to float8_e4m3fn (values beyond +-448 clip to +-448)."""
  scaled = x.astype(jnp.float32) * scale
  return jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, kernel: jax.Array, scales: jax.Array) -> jax.Array:
  """``x [.., in] @ kernel [in, out]`` through E4M3 with per-tensor ``scales = (s_x, s_w)``.
  Returns float32."""
  qx = quantize_e4m3(x, scales[0]).astype(jnp.float32)
  qw = quantize_e4m3(kernel, scales[1]).astype(jnp.float32)
  y = jnp.dot(qx, qw, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return y / (scales[0] * scales[1])


def _fp8_fwd(x, kernel, scales):
  return fp8_matmul(x, kernel, scales), (x, kernel, scales)


def _fp8_bwd(res, g):
  x, kernel, scales = res  # straight-through: the unquantised GEMM's gradients
  gx = jnp.dot(g, kernel.astype(jnp.float32).T).astype(x.dtype)
  gw = jnp.einsum("...i,...o->io", x.astype(jnp.float32), g).astype(kernel.dtype)
  return gx, gw, jnp.zeros_like(scales)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def current_scales(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.stop_gradient(jnp.stack([
      scale_from_amax(jnp.max(jnp.abs(x.astype(jnp.float32)))),
      scale_from_amax(jnp.max(jnp.abs(kernel.astype(jnp.float32))))]))


def scales_from_extra_state(state: dict[str, Any]) -> np.ndarray:
  """(input, weight) forward scales from a Transformer Engine Linear's extra state.

  The recipe updates scales from the amax history when an ``fp8_autocast`` region exits, so the
  first forward pass after loading a checkpoint quantises with the stored ``scale_fwd``
  (entries 0 = GEMM input, 1 = weight, 2 = output); that is what is returned, so every call
  here equals that first reference call. Non-finite or non-positive scales are an error.
  """
  if "scale_fwd" not in state:
    raise ValueError(f"FP8 extra state has no 'scale_fwd'; keys: {sorted(state)}")
  scale = np.asarray(state["scale_fwd"], np.float32).reshape(-1)
  if scale.size < 2:
    raise ValueError(f"FP8 extra state holds {scale.size} forward scales; expected >= 2 "
                     "(input, weight)")
  if not np.all(np.isfinite(scale[:2]) & (scale[:2] > 0)):
    raise ValueError(f"FP8 extra state has invalid forward scales {scale[:2].tolist()}")
  return scale[:2].copy()


__all__ = ["E4M3_MAX", "FP8_MODES", "Fp8Scales", "current_scales", "fp8_matmul",
           "quantize_e4m3", "scale_from_amax", "scales_from_extra_state"]
