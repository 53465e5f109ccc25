"""Mode values and the state they carry: how one call of the model, a block or a mixer runs.

Every mixer, block and the model have one call, ``(x, mode, cache) -> (y, new cache)``
(docs/architecture.md, "One forward"). The mode says what the input is:

  FULL            the whole sequence from position 0 (training, evaluation, scoring, embed);
                  no cache in, none out.
  Prefill         right-padded prompts of per-row ``lengths``: the full forward, and each
                  mixer fills its empty cache (``init_cache``) as of each row's length.
  Decode          one token per row at per-row ``positions``: the recurrent forms.
  Segment         a segment of S tokens at ``offset`` continuing the carried cache; with
                  ``kv`` (a ``ShardedKV``) the KV caches are sharded by position over a mesh.
  ContextParallel inside ``shard_map``: this rank's zig-zag shard of the sequence, the
                  collectives of each operator named by the value (``parallel/``).

The caches are NamedTuples of arrays (pytrees): ``HyenaCache`` per Hyena layer, ``KVCache``
per attention layer, ``Cache`` for the model (row lengths + one per block).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sh2_jax.config import CONTEXT_ATTENTION_MODES, CONTEXT_LI_MODES, CONTEXT_MR_MODES

CONTEXT_AXIS = "context"


class HyenaCache(NamedTuple):
  """The FIR histories are rings (``to_ring``): the input at position p sits in slot p mod K,
  so a decoding step writes one slot in place instead of shifting the whole window."""

  z_hist: jax.Array  # [B, featurizer_len, 3D] compute dtype: the last featurizer inputs, a ring
  state: jax.Array   # SE/MR: [B, K, D] compute dtype, the last inner-filter inputs, a ring;
                     # LI: [B, D, N] float32, the modal state


class KVCache(NamedTuple):
  k: jax.Array  # [B, max_len, H, d], RoPE applied
  v: jax.Array


class Cache(NamedTuple):
  lengths: jax.Array  # [B] int32: each row's consumed tokens (the position of its next token)
  layers: tuple       # one HyenaCache / KVCache per block


@dataclasses.dataclass(frozen=True)
class Full:
  """The whole sequence [B, L] from position 0."""


FULL = Full()


@dataclasses.dataclass(frozen=True)
class Prefill:
  """Right-padded prompts: row b's prompt is its first ``lengths[b]`` tokens ([B] int32)."""

  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class Decode:
  """One token per row, row b at position ``positions[b]`` ([B] int32)."""

  positions: jax.Array


@dataclasses.dataclass(frozen=True)
class ShardedKV:
  """The KV cache sharded by position over ``axis`` of ``mesh``: blocks of ``stripe``
  positions, block g on rank g mod N at local slot g // N. A segment (or decoded token) must
  not straddle two blocks: segments of ``stripe`` tokens starting at multiples of it do not."""

  mesh: jax.sharding.Mesh
  stripe: int
  axis: str = CONTEXT_AXIS

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]


@dataclasses.dataclass(frozen=True)
class Segment:
  """S tokens of every row continuing at position ``offset`` (a scalar int32, the same for all
  rows) from the carried cache; ``kv``: the KV caches are laid out as it says."""

  offset: jax.Array
  kv: ShardedKV | None = None


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """How the model runs over the ``axis_name`` mesh axis of ``size`` ranks (inside
  ``shard_map``, on this rank's zig-zag shard): the collective per operator --
  featurizer and SE by halo exchange; MR by ``mr_mode`` (p2p | a2a); LI by ``li_mode``
  (a2a | p2p_fft | state); attention by ``attention_mode`` (allgather | ring)."""

  size: int
  axis_name: str = CONTEXT_AXIS
  mr_mode: str = "p2p"
  li_mode: str = "a2a"
  attention_mode: str = "allgather"
  remat: bool = False  # recompute each block in the backward pass (long sequences)

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"context size {self.size!r} must be a positive integer")
    for name, value, valid in (("mr_mode", self.mr_mode, CONTEXT_MR_MODES),
                               ("li_mode", self.li_mode, CONTEXT_LI_MODES),
                               ("attention_mode", self.attention_mode, CONTEXT_ATTENTION_MODES)):
      if value not in valid:
        raise ValueError(f"context {name} {value!r} is not one of {', '.join(valid)}")


def last_steps(x: jax.Array, lengths: jax.Array, n: int) -> jax.Array:
  """The last n steps of each row before its length: x [B, L, C], lengths [B] -> [B, n, C],
  ``out[b, i] = x[b, lengths[b] - n + i]``, zeros where that index is negative."""
  idx = lengths[:, None] - n + jnp.arange(n)[None, :]  # [B, n]
  out = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1)[..., None], axis=1)
  return jnp.where((idx >= 0)[..., None], out, jnp.zeros_like(out))


def right_align(x: jax.Array, lengths: jax.Array) -> jax.Array:
  """Shift each row so its step ``lengths[b]-1`` lands at index L-1, zeros before its start:
  x [B, L, C] -> [B, L, C]. Makes right-padded rows look like sequences of the full length."""
  length = x.shape[1]
  idx = lengths[:, None] - length + jnp.arange(length)[None, :]  # [B, L] source index
  out = jnp.take_along_axis(x, jnp.clip(idx, 0, length - 1)[..., None], axis=1)
  return jnp.where((idx >= 0)[..., None], out, jnp.zeros_like(out))


def with_history(hist: jax.Array, x: jax.Array) -> jax.Array:
  """[hist; x] along the sequence axis, in x's dtype."""
  return jnp.concatenate([hist.astype(x.dtype), x], axis=1)


def _ring_index(end, size: int, batch: int) -> jax.Array:
  """[B, K]: ``(j - end[b]) mod K`` for slot j (``end`` [B] or a scalar)."""
  end = jnp.broadcast_to(jnp.asarray(end, jnp.int32), (batch,))
  return (jnp.arange(size, dtype=jnp.int32)[None, :] - end[:, None]) % size


def to_ring(window: jax.Array, end) -> jax.Array:
  """A window of the K steps before ``end`` (x [B, K, C], oldest first: positions end-K ..
  end-1; ``end`` [B] or a scalar) as a ring: position p in slot p mod K."""
  b, k = window.shape[:2]
  idx = _ring_index(end, k, b)  # slot j holds window[(j - end) mod K]
  return jnp.take_along_axis(window, idx[..., None], axis=1)


def from_ring(ring: jax.Array, end) -> jax.Array:
  """``to_ring``'s inverse: the ring [B, K, C] as the window of positions end-K .. end-1."""
  b, k = ring.shape[:2]
  idx = _ring_index(-jnp.asarray(end, jnp.int32), k, b)  # window[i] = ring[(end + i) mod K]
  return jnp.take_along_axis(ring, idx[..., None], axis=1)


def ring_write(ring: jax.Array, positions: jax.Array, x: jax.Array) -> jax.Array:
  """Row b's ``x[b]`` ([B, C]) into slot ``positions[b] mod K`` of the ring [B, K, C]: one slot
  per row, in place when the ring is not read before (read the written ring, not the old)."""
  return write_rows(ring, positions % ring.shape[1], x)


def write_rows(cache: jax.Array, index: jax.Array, x: jax.Array) -> jax.Array:
  """``cache[b, index[b]] = x[b]`` for every row b (cache [B, S, ...], x [B, ...]). The (row,
  index) pairs are distinct, so the scatter says so: XLA GPU then stores the updates instead
  of looping atomic compare-and-swaps over them (16-bit types have no atomic exchange). An
  index past the end drops its row's update."""
  rows = jnp.arange(cache.shape[0])
  return cache.at[rows, index].set(x.astype(cache.dtype), unique_indices=True,
                                   indices_are_sorted=True)
