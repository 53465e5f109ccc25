"""LI by passing modal states: the communication is [B, D, N] numbers per chunk, not [L, D].

The LI filter is a sum of N decaying exponentials, so everything a chunk needs from the past is
the modal state s_n = sum_{tau < start} a_n^(start-1-tau) u[tau] (a_n = exp(lambda_n)), and
the history adds ``sum_n R_n a_n^(t+1) s_n`` to output t of the chunk (t counted from the chunk
start). Each rank
  1. runs the ordinary LI operator (``dispatch.gated_modal``: FFT or the Pallas modal scan) on its
     two chunks as independent sequences,
  2. computes each chunk's own end state (``conv.modal_state``) and all-gathers them — 2N states of
     [B, D, N] in all,
  3. folds them in chunk order (s_in[j+1] = a^c s_in[j] + s_local[j]; 2N tiny steps, done
     redundantly on every rank) and adds the history term (``conv.modal_sum``) to its chunks.
Exact in exact arithmetic, any context size, any li_impl inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax import conv, dispatch
from sh2_jax.parallel.zigzag import merge_chunks, split_chunks


def state_modal_conv(u: jax.Array, log_poles: jax.Array, residues: jax.Array, impl: str,
                     axis_name: str, n: int) -> jax.Array:
  """Causal LI convolution (poles/residues [D, S]) of the zig-zag shard u: [B, 2c, D]."""
  b, l2, d = u.shape
  c = l2 // 2
  uc = split_chunks(u).reshape(2 * b, c, d)  # the two chunks as independent sequences
  ones = jnp.broadcast_to(jnp.ones((), u.dtype), uc.shape)
  y = dispatch.gated_modal(uc, ones, ones, log_poles, residues, None, impl).astype(jnp.float32)
  own = conv.modal_state(uc, log_poles).reshape(b, 2, d, -1)  # [B, slot, D, S]
  states = jax.lax.all_gather(own, axis_name)  # [N, B, slot, D, S]
  ordered = jnp.concatenate([states[:, :, 0], states[::-1, :, 1]], axis=0)  # chunk order [2N, ...]
  carry = jnp.exp(log_poles.astype(jnp.float32) * c)  # a^c: [D, S]
  incoming = [jnp.zeros_like(ordered[0])]
  for j in range(2 * n - 1):
    incoming.append(carry * incoming[-1] + ordered[j])
  incoming = jnp.stack(incoming)  # [2N, B, D, S]: the state entering each chunk
  r = jax.lax.axis_index(axis_name)
  mine = jnp.stack([incoming[r], incoming[2 * n - 1 - r]], axis=1)  # [B, slot, D, S]
  weights = (residues.astype(jnp.float32) * mine).reshape(2 * b, 1, d, -1)
  t = jnp.arange(1, c + 1, dtype=jnp.float32)[:, None]  # a^(t+1), t = 0 .. c-1
  y = y + conv.modal_sum(log_poles, weights, t)  # [2B, c, D]
  return merge_chunks(y.reshape(b, 2, c, d)).astype(u.dtype)


def state_gated_modal(x1, v, x2, log_poles, residues, dskip, impl, axis_name, n):
  """LI by state passing: ``x2 * (h_modal * u + dskip * u)``, u = x1 * v; all [B, 2c, D]."""
  return conv.gated_conv(
      x1, v, x2, lambda u: state_modal_conv(u, log_poles, residues, impl, axis_name, n), dskip)
