"""The LI (modal) filter in plain jnp: its taps, its end state, its recurrent step, the one
scan that carries states across segments, and the one response of a carried state.

An LI channel d is a sum of N decaying modes: ``h[d, t] = sum_n R[d, n] exp(lambda[d, n] t)``
(lambda real, negative). As a recurrence: ``s <- exp(lambda) s + u``, ``y = sum_n R s`` (the
skip term belongs to the gate). docs/architecture.md, "The modal recurrence", derives the
segment identities used here. Shapes: u [B, L, D]; log_poles (lambda), residues (R) [D, N];
states [B, D, N] float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

def modal_filter(log_poles: jax.Array, residues: jax.Array, length: int) -> jax.Array:
  """The LI long filter ``h[d, t] = sum_n R[d, n] exp(lambda[d, n] t)``, float32.

  log_poles: [D, N] (lambda, real, negative); residues: [D, N]. Returns [D, length].
  """
  return modal_sum(log_poles, residues, jnp.arange(length, dtype=jnp.float32)[:, None]).T


def modal_sum(log_poles: jax.Array, weights: jax.Array, t: jax.Array) -> jax.Array:
  """``out[..., d] = sum_n weights[..., d, n] exp(lambda[d, n] t)`` in float32, one mode at a
  time so no [.., D, N, T] array is formed (at 1M tokens that would be hundreds of GB).

  log_poles: [D, N]; weights: [D, N] or [B, D, N]; t: times broadcasting against the
  result's leading axes, e.g. [T, 1] -> [T, D] or [B, T, 1] with weights [B, 1, D, N]."""
  lam = log_poles.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  t = t.astype(jnp.float32)
  out = 0.0
  for n in range(lam.shape[-1]):
    out = out + w[..., n] * jnp.exp(lam[:, n] * t)
  return out


def modal_state(u: jax.Array, log_poles: jax.Array) -> jax.Array:
  """The LI modal state after a sequence: ``s[b,d,n] = sum_{k<L} exp(lambda[d,n] (L-1-k)) u[b,k,d]``.

  u: [B, L, D]; log_poles: [D, N] (lambda < 0). Returns [B, D, N] float32. Two levels of
  reverse-weighted sums (inside chunks of c tokens, then across chunks) so every exponent is
  <= 0 and no [L, D, N] weight is ever formed.
  """
  b, length, d = u.shape
  chunk = max(64, 1 << math.ceil(math.log2(math.sqrt(length))))
  chunks = -(-length // chunk)
  uf = jnp.pad(u.astype(jnp.float32), ((0, 0), (chunks * chunk - length, 0), (0, 0)))
  uf = uf.reshape(b, chunks, chunk, d)
  lam = log_poles.astype(jnp.float32)[None]  # [1, D, N]
  hi = jax.lax.Precision.HIGHEST
  age_in = jnp.arange(chunk - 1, -1, -1, dtype=jnp.float32)[:, None, None]  # c-1-j
  part = jnp.einsum("bmjd,jdn->bmdn", uf, jnp.exp(lam * age_in), precision=hi)
  age_out = (jnp.arange(chunks - 1, -1, -1, dtype=jnp.float32) * chunk)[:, None, None]
  return jnp.einsum("bmdn,mdn->bdn", part, jnp.exp(lam * age_out), precision=hi)


def modal_step(state: jax.Array, u: jax.Array, log_poles: jax.Array, residues: jax.Array):
  """One LI step: ``s <- exp(lambda) s + u``, ``y = sum_n R s`` (the skip term is the gate's).

  state: [B, D, N] float32; u: [B, D]; log_poles, residues: [D, N]. Returns (y [B, D] float32,
  new state).
  """
  state = jnp.exp(log_poles.astype(jnp.float32)) * state + u.astype(jnp.float32)[..., None]
  y = jnp.einsum("bdn,dn->bd", state, residues.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return y, state


def segment_states(end_states: jax.Array, log_poles: jax.Array, length, s0=None) -> jax.Array:
  """The incoming state of every segment from each segment's own from-zero end state.

  end_states: [K, ..., D, N] float32 over K consecutive segments of ``length`` tokens (a scalar
  or a [K] array); s0: the state entering segment 0 (zeros when None). Returns [K, ..., D, N]:
  ``s_in[0] = s0``, ``s_in[k+1] = exp(lambda length) s_in[k] + e[k]`` -- a sequential scan over
  K tiny states (exclusive: segment k's own end state is not in its incoming state).
  """
  lam = log_poles.astype(jnp.float32)
  lengths = jnp.broadcast_to(jnp.asarray(length, jnp.float32), end_states.shape[:1])

  def body(s, xs):
    e, n = xs
    return jnp.exp(lam * n) * s + e, s

  s0 = jnp.zeros_like(end_states[0]) if s0 is None else s0.astype(jnp.float32)
  _, s_in = jax.lax.scan(body, s0, (end_states.astype(jnp.float32), lengths))
  return s_in


def state_response(state: jax.Array, log_poles: jax.Array, residues: jax.Array, length: int,
                   chunk: int = 256) -> jax.Array:
  """What a state s carried in at position -1 adds to the filter output over ``length`` tokens:
  ``r[b, t, d] = sum_n R[d,n] exp(lambda[d,n] (t+1)) s[b,d,n]``, [B, length, D] float32.

  Chunked so that no [L, D, N] table is formed: r[t0 + i] = sum_n (R a^(i+1))[i] (a^t0 s),
  every exponent of a = exp(lambda) non-negative (no overflow).
  """
  lam = log_poles.astype(jnp.float32)
  chunk = min(chunk, length)
  chunks = -(-length // chunk)
  hi = jax.lax.Precision.HIGHEST
  i = jnp.arange(1, chunk + 1, dtype=jnp.float32)[:, None, None]
  inner = residues.astype(jnp.float32)[None] * jnp.exp(lam[None] * i)       # [c, D, N]
  t0 = (jnp.arange(chunks, dtype=jnp.float32) * chunk)[:, None, None]
  outer = jnp.exp(lam[None] * t0)[None] * state.astype(jnp.float32)[:, None]  # [B, M, D, N]
  r = jnp.einsum("idn,bmdn->bmid", inner, outer, precision=hi)
  return r.reshape(state.shape[0], chunks * chunk, -1)[:, :length]


def advance_state(state: jax.Array, u: jax.Array, log_poles: jax.Array) -> jax.Array:
  """The state after ``u`` [B, S, D] continues from ``state`` [B, D, N]:
  ``exp(lambda S) state + modal_state(u)``."""
  lam = log_poles.astype(jnp.float32)
  return jnp.exp(lam * u.shape[1])[None] * state + modal_state(u, lam)
