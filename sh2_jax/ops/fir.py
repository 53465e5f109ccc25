"""Causal depthwise convolution in plain jnp: the featurizer, the SE / MR filters, FFT
convolution, the gate around every inner filter, and the one-token recurrent form.

Every filter here is in *true-convolution* orientation: ``h[..., 0]`` multiplies the current
token, ``y[t] = sum_k h[k] u[t - k]`` (docs/architecture.md, "Orientations"). The checkpoint's
cross-correlation filters (featurizer, SE) are flipped by the modules that own them, never here.

These functions are the training path on CPU, the decode path's building blocks, and the
references of the Pallas kernels. Shapes: ``u: [B, L, C]``; grouped filters ``h: [G, K]`` where
group g serves the contiguous channels ``g*C/G … (g+1)*C/G - 1``; per-channel ``h: [C, K]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MR_DECAY_PRESETS = {"weak": (-2.0, 2.0), "normal": (-1.0, 2.0), "strong": (0.0, 2.0)}


def expand_groups(h: jax.Array, channels: int) -> jax.Array:
  """[G, K] grouped filters -> [C, K] per-channel filters (contiguous groups)."""
  groups = h.shape[0]
  if channels % groups:
    raise ValueError(f"filter groups {groups} do not divide channels {channels}")
  return jnp.repeat(h, channels // groups, axis=0)


def fir_conv(u: jax.Array, h: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Causal depthwise FIR through XLA's grouped convolution.

  u: [B, L, C]; h: [G, K] (G divides C), true-convolution orientation. Returns [B, L, C] in
  u's dtype, accumulated in float32.
  """
  _, length, channels = u.shape
  h_full = expand_groups(h, channels)  # [C, K]
  taps = h_full.shape[1]
  # conv_general_dilated is a cross-correlation: flip the taps, pad K-1 zeros on the left.
  rhs = jnp.flip(h_full, axis=1).T[:, None, :].astype(u.dtype)  # [K, 1, C] (WIO)
  y = jax.lax.conv_general_dilated(
      u, rhs, window_strides=(1,), padding=[(taps - 1, 0)],
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=channels,
      precision=precision, preferred_element_type=jnp.float32)
  del length
  return y.astype(u.dtype)


def fir_conv_shifted(u: jax.Array, h: jax.Array) -> jax.Array:
  """The same causal FIR as ``fir_conv`` as a sum of shifted copies (cheap for short filters,
  and what the decode step and the context-parallel halo code reuse). float32 accumulation."""
  h_full = expand_groups(h, u.shape[-1]).astype(jnp.float32)  # [C, K]
  taps = [h_full[:, k] for k in range(h_full.shape[1])]
  return shifted_sum(u.astype(jnp.float32), taps).astype(u.dtype)


def shifted_sum(uf: jax.Array, taps) -> jax.Array:
  """``sum_k taps[k] * uf[:, t - k]`` (zeros before the start), in uf's dtype: the causal FIR
  by shifted copies, with the filter as one weight vector per tap (``taps[k]``: [C]; a [K, C]
  array or a sequence of K vectors)."""
  length = uf.shape[1]
  y = jnp.zeros_like(uf)
  for k in range(min(len(taps), length)):
    shifted = jnp.pad(uf, ((0, 0), (k, 0), (0, 0)))[:, :length]
    y = y + taps[k] * shifted
  return y


def fft_conv(u: jax.Array, h: jax.Array, out_dtype=None) -> jax.Array:
  """Causal per-channel convolution by FFT of size 2L in float32.

  u: [B, L, C]; h: [C, K] or grouped [G, K] with any K (taps past L are ignored, shorter
  filters are zero-padded). Returns [B, L, C] in ``out_dtype`` (default u's dtype; the gates
  ask for float32 so the result is not rounded twice).
  """
  _, length, channels = u.shape
  h = h[:, :length]
  if h.shape[0] != channels:
    h = expand_groups(h, channels)
  n = 2 * length
  # The real filter is transposed, not its complex spectrum: [n/2+1, C] straight from the FFT.
  hf = jnp.fft.rfft(h.astype(jnp.float32).T, n=n, axis=0)  # [n/2+1, C]
  uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)    # [B, n/2+1, C]
  y = jnp.fft.irfft(uf * hf[None], n=n, axis=1)[:, :length]
  return y.astype(out_dtype or u.dtype)


def featurizer_conv(z: jax.Array, w: jax.Array) -> jax.Array:
  """The Hyena featurizer: depthwise causal FIR over all 3D channels (w: [3D, 3], true
  convolution orientation), as shifted sums — three taps are cheaper than a convolution call."""
  return fir_conv_shifted(z, w)


def interleaved_split(zc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[.., 3D] -> (x2, x1, v) from the interleaved channels 0::3, 1::3, 2::3."""
  return zc[..., 0::3], zc[..., 1::3], zc[..., 2::3]


REDUCE_ROWS = 256  # tokens summed per partial in the featurizer's filter gradient


def tap_vectors(w: jax.Array) -> list[jax.Array]:
  """w [C, K] -> K contiguous float32 [C] vectors, each behind an optimisation barrier: the
  taps of ``featurize`` under differentiation.

  Read as stride-K columns of w, the taps kept XLA's featurizer fusion of the training step far
  from its inference speed (6.11 ms per Hyena layer at 128K, width 4096, H200); as separate
  vectors it runs in 3.26 ms there — but the inference forward's fusion, 2.24 ms with the taps
  as w's columns, takes 3.08 ms with them (benchmarks/RESULTS.md, "A featurizer kernel, measured
  and not adopted; the taps as vectors under differentiation"), so ``featurize`` uses them only
  in its VJP forward and backward. One barrier over a [K, C] transpose is not enough: layout
  assignment gives it the column-major layout that makes the transpose a bitcast."""
  return [jax.lax.optimization_barrier(w[:, k].astype(jnp.float32)) for k in range(w.shape[1])]


@jax.custom_vjp
def featurize(z: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``interleaved_split(featurizer_conv(z, w))``: z [B, L, 3D] -> (x2, x1, v), each [B, L, D].

  The same forward, with the backward written out: autodiff fused the filter gradient (a sum
  over all B·L tokens per channel and tap) and dz into one multi-output XLA reduction that took
  ~18 ms per Hyena layer of the 7B train step at 32K on an H200 (17% of the step). Here dz is
  one elementwise pass (``dz[t] = sum_k w_k g[t + k]``, float32, rounded once) and dw sums
  ``g[t] z[t - k]`` over rows of ``REDUCE_ROWS`` tokens, then over the partials. Under
  differentiation the forward and backward take the taps as ``tap_vectors`` (the same numbers:
  the same operations in the same order).
  """
  return interleaved_split(featurizer_conv(z, w))


def featurize_taps(z: jax.Array, taps) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``featurize`` with its taps given (w's columns, ``tap_vectors`` ...): the shifted sum in
  float32, rounded once to z's dtype, split into (x2, x1, v)."""
  return interleaved_split(shifted_sum(z.astype(jnp.float32), taps).astype(z.dtype))


def featurize_taps_grads(z: jax.Array, w: jax.Array, taps, g):
  """The gradients of ``featurize_taps(z, taps)`` for the cotangents g = (gx2, gx1, gv):
  (dz in z's dtype, dw [3D, K] in w's dtype, taps being w's)."""
  dz, dw = shifted_sum_grads(z, taps, interleave(g))
  return dz.astype(z.dtype), dw.astype(w.dtype)


def _featurize_fwd(z, w):
  return featurize_taps(z, tap_vectors(w)), (z, w)


def _featurize_bwd(res, g):
  z, w = res
  return featurize_taps_grads(z, w, tap_vectors(w), g)


def interleave(parts) -> jax.Array:
  """The inverse of ``interleaved_split`` for (x2, x1, v)-shaped arrays [B, L, D]: [B, L, 3D]
  float32 with the parts at channels 0::3, 1::3, 2::3."""
  b, length, d = parts[0].shape
  return jnp.stack([p.astype(jnp.float32) for p in parts], axis=-1).reshape(b, length, 3 * d)


def featurizer_conv_grads(z: jax.Array, w: jax.Array, gy: jax.Array):
  """The gradients of ``featurizer_conv(z, w)`` for its output's cotangent ``gy`` [B, L, C]
  (float32): (dz in z's dtype, dw [C, K] in w's dtype), written out (see ``featurize``)."""
  wf = w.astype(jnp.float32)
  dz, dw = shifted_sum_grads(z, [wf[:, k] for k in range(w.shape[1])], gy)
  return dz.astype(z.dtype), dw.astype(w.dtype)


def shifted_sum_grads(z: jax.Array, taps, gy: jax.Array):
  """The gradients of ``shifted_sum(z as float32, taps)`` for the cotangent ``gy`` [B, L, C]
  (float32): (dz [B, L, C], dw [C, K]), both float32. dz is one elementwise pass
  (``dz[t] = sum_k taps[k] gy[t + k]``); dw sums ``gy[t] z[t - k]`` over rows of
  ``REDUCE_ROWS`` tokens, then over the partials."""
  b, length, c = z.shape
  zf = z.astype(jnp.float32)
  rows = -(-length // REDUCE_ROWS) * REDUCE_ROWS
  dz = jnp.zeros_like(gy)
  dw = []
  for k in range(min(len(taps), length)):
    dz = dz + taps[k] * jnp.pad(gy, ((0, 0), (0, k), (0, 0)))[:, k:]
    prod = gy * jnp.pad(zf, ((0, 0), (k, 0), (0, 0)))[:, :length]
    prod = jnp.pad(prod, ((0, 0), (0, rows - length), (0, 0)))
    dw.append(prod.reshape(b, rows // REDUCE_ROWS, REDUCE_ROWS, c).sum(axis=2).sum(axis=(0, 1)))
  dw += [jnp.zeros((c,), jnp.float32)] * (len(taps) - len(dw))
  return dz, jnp.stack(dw, axis=1)


featurize.defvjp(_featurize_fwd, _featurize_bwd)


def mr_decay(groups: int, taps: int, preset: str, decay_length: int | None = None) -> np.ndarray:
  """The MR regularising decay ``exp(-r_g t_k)``: [G, K] float32 constants.

  ``r = logspace(a, b, G)`` (base 10) with (a, b) from the preset; ``t = linspace(0, 1,
  decay_length)[:K]`` (decay_length defaults to K, so the last tap sits at t = 1).
  """
  if preset == "none":
    return np.ones((groups, taps), np.float32)
  if preset not in MR_DECAY_PRESETS:
    raise ValueError(f"mr_decay {preset!r} is not one of {sorted(MR_DECAY_PRESETS) + ['none']}")
  a, b = MR_DECAY_PRESETS[preset]
  rates = np.logspace(a, b, groups)
  t = np.linspace(0.0, 1.0, decay_length or taps)[:taps]
  return np.exp(-rates[:, None] * t[None, :]).astype(np.float32)


def gated_conv(x1: jax.Array, v: jax.Array, x2: jax.Array, conv, dskip: jax.Array | None):
  """``y = x2 * (conv(u) + dskip * u)`` with ``u = x1 * v``: the gates around every inner filter.
  The skip and gate run in float32 and the result is cast back to x1's dtype."""
  u = x1 * v
  y = conv(u).astype(jnp.float32)
  if dskip is not None:
    y = y + dskip.astype(jnp.float32) * u.astype(jnp.float32)
  return (x2.astype(jnp.float32) * y).astype(x1.dtype)


def fir_step(window: jax.Array, h: jax.Array) -> jax.Array:
  """One output of the causal FIR ``fir_conv``: its recurrent form.

  window: [B, K, C], the last K inputs oldest first (``window[:, -1]`` is the current token;
  zeros before the sequence start); h: [G, K] grouped or [C, K] per-channel, true-convolution
  orientation. Returns ``sum_k h[:, k] * window[:, K-1-k]``: [B, C] in window's dtype,
  accumulated in float32.
  """
  if window.shape[1] != h.shape[1]:
    raise ValueError(f"fir_step window of {window.shape[1]} steps does not match "
                     f"{h.shape[1]} filter taps")
  h_full = expand_groups(h, window.shape[-1]).astype(jnp.float32)  # [C, K]
  y = jnp.einsum("bkc,ck->bc", jnp.flip(window, axis=1).astype(jnp.float32), h_full,
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(window.dtype)

