"""Zig-zag sequence sharding over N context ranks, and its inverse.

The sequence of length L is cut into 2N chunks of c = L / (2N) tokens; rank r holds chunks r and
2N-1-r (in that order), so every rank owns the same amount of causal work (attention) and the
FIR halos only ever cross to a neighbouring rank. ``zigzag_shard`` reorders the global sequence
so that a plain contiguous split over the ``context`` axis gives each rank its two chunks:

  global order  0 1 2 3 4 5 6 7        (N = 4, 8 chunks)
  zig-zag order 0 7 | 1 6 | 2 5 | 3 4  (rank 0 | rank 1 | rank 2 | rank 3)

Inside ``shard_map`` a rank sees its [B, 2c, ...] shard; ``local_positions`` gives the global
token index of every row (for RoPE), ``split_chunks`` the [B, 2, c, ...] view of its two chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def chunk_length(length: int, n: int) -> int:
  """c = L / (2N), with a clear error when the sequence cannot be split."""
  if n < 1:
    raise ValueError(f"context size {n} must be a positive integer")
  if length % (2 * n):
    raise ValueError(f"sequence length {length} cannot be zig-zag sharded over {n} context ranks:"
                     f" it must be a multiple of 2 * {n} = {2 * n}")
  return length // (2 * n)


def zigzag_chunk_order(n: int) -> np.ndarray:
  """[2N] the global chunk index at each zig-zag slot: 0, 2N-1, 1, 2N-2, ..."""
  return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def zigzag_permutation(length: int, n: int) -> np.ndarray:
  """[L] int: ``x_zigzag = x[perm]``; ``perm`` is also the global position of each zig-zag row."""
  c = chunk_length(length, n)
  return (zigzag_chunk_order(n)[:, None] * c + np.arange(c)[None, :]).reshape(-1)


def zigzag_shard(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
  """Global order -> zig-zag order along ``axis`` (then split contiguously over the context axis)."""
  return jnp.take(x, jnp.asarray(zigzag_permutation(x.shape[axis], n)), axis=axis)


def zigzag_unshard(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
  """Zig-zag order -> global order along ``axis``: the inverse of ``zigzag_shard``."""
  inverse = np.argsort(zigzag_permutation(x.shape[axis], n))
  return jnp.take(x, jnp.asarray(inverse), axis=axis)


def local_positions(local_length: int, n: int, axis_name: str) -> jax.Array:
  """Inside shard_map: [2c] global positions of this rank's rows (chunks r and 2N-1-r)."""
  c = local_length // 2
  r = jax.lax.axis_index(axis_name)
  t = jnp.arange(c)
  return jnp.concatenate([r * c + t, (2 * n - 1 - r) * c + t])


def split_chunks(x: jax.Array) -> jax.Array:
  """[B, 2c, ...] -> [B, 2, c, ...]: slot 0 is chunk r, slot 1 is chunk 2N-1-r."""
  b, l2 = x.shape[:2]
  if l2 % 2:
    raise ValueError(f"a zig-zag shard holds two chunks; its length {l2} must be even")
  return x.reshape(b, 2, l2 // 2, *x.shape[2:])


def merge_chunks(x: jax.Array) -> jax.Array:
  """[B, 2, c, ...] -> [B, 2c, ...]."""
  return x.reshape(x.shape[0], 2 * x.shape[2], *x.shape[3:])
