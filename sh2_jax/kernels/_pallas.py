"""Generic Pallas (Triton) helpers shared by the kernel families: the launch (compiler params,
the one place the Triton-backend deprecation warning is silenced, NaN-poisoned outputs for
tests), float32-accumulating dots and masked stores."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


def check_gated_inputs(x1, v, x2) -> None:
  """The gated operators' inputs x1, v, x2: one shape [B, L, D], one dtype (bf16 or f32)."""
  if x1.ndim != 3 or x1.shape != v.shape or x1.shape != x2.shape:
    raise ValueError(f"x1, v, x2 must share one shape [B, L, D]; got {x1.shape}, {v.shape}, "
                     f"{x2.shape}")
  if not (x1.dtype == v.dtype == x2.dtype) or x1.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x1, v, x2 must all be bfloat16 or float32; got {x1.dtype}, {v.dtype}, "
                     f"{x2.dtype}")


def dot_precision(dtype):
  # float32 inputs get full-precision FMA dots (Triton's default would be tf32, ~3e-4 error).
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, precision, trans_b: bool = False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def store(ref, idx, val, mask):
  """``ref[idx] = val``, only the columns where ``mask`` [1, w] holds (None: all)."""
  if mask is None:
    ref[idx] = val
  else:
    plgpu.store(ref.at[idx], val, mask=jnp.broadcast_to(mask, val.shape))


def call_pallas(kernel, out_shape, grid, bs, interpret: bool, name: str, poison: bool,
                *args):
  """pallas_call with the Triton compiler params; silences only the Triton-backend deprecation
  warning, here. With ``poison`` the outputs start as NaN (aliased inputs) so tests see any
  element the kernel failed to write."""
  n_in = len(args)
  aliases = {}
  if poison:
    args = args + tuple(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape)
    aliases = {n_in + i: i for i in range(len(out_shape))}
    inner = kernel
    n_out = len(out_shape)

    def kernel(*refs):  # drop the aliased poison inputs: the outputs are the same buffers
      return inner(*refs[:n_in], *refs[n_in + n_out:])

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, input_output_aliases=aliases,
        interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    )(*args)
