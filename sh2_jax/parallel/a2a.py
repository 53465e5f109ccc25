"""All-to-all context parallelism: sequence shards [B, L/N, C] <-> channel shards [B, L, C/N].

Used for LI (the long filter needs the whole sequence) and optionally MR. Each rank sends u =
x1 * v once and gets the filtered channels back once; the gates stay local (two D-wide
transfers instead of four). After the all-to-all a rank holds all 2N chunks of its channels in
zig-zag order and puts them in global order before the local convolution (the configured
core handed in, ``dispatch.fir_fn`` / ``modal_fn``: Pallas / FFT per config), then reverses
both steps. Rank r owns channels r*C/N .. (r+1)*C/N-1,
so grouped filters are sliced by whole groups: a filter group must never straddle two ranks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax.ops import fir


def seq_to_channels(x: jax.Array, axis_name: str, n: int) -> jax.Array:
  """[B, 2c, C] zig-zag shard -> [B, L, C/N] the whole sequence (global order), C/N channels."""
  b, l2, ch = x.shape
  if ch % n:
    raise ValueError(f"all-to-all needs channels {ch} divisible by the context size {n}")
  y = jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
  y = y.reshape(b, n, 2, l2 // 2, ch // n)  # [B, source rank, slot, c, C/N]
  y = jnp.concatenate([y[:, :, 0], y[:, ::-1, 1]], axis=1)  # chunks 0..N-1, then N..2N-1
  return y.reshape(b, n * l2, ch // n)


def channels_to_seq(y: jax.Array, axis_name: str, n: int) -> jax.Array:
  """[B, L, C/N] (global order) -> [B, 2c, C] zig-zag shard: the inverse of seq_to_channels."""
  b, length, chn = y.shape
  c = length // (2 * n)
  y = y.reshape(b, 2 * n, c, chn)
  y = jnp.stack([y[:, :n], y[:, n:][:, ::-1]], axis=2)  # [B, rank, slot, c, C/N]
  y = y.reshape(b, 2 * c * n, chn)
  return jax.lax.all_to_all(y, axis_name, split_axis=1, concat_axis=2, tiled=True)


def _rank_groups(h: jax.Array, channels: int, axis_name: str, n: int, what: str) -> jax.Array:
  """The rows of a [G, ...] per-group (or per-channel) parameter that serve this rank's C/N
  channels; G must split into whole groups per rank."""
  groups = h.shape[0]
  if groups % n:
    raise ValueError(f"{what}: {groups} filter groups cannot be split over {n} context ranks "
                     f"without splitting a group across ranks; choose a context size dividing "
                     f"{groups}, or the p2p mode")
  per = groups // n
  return jax.lax.dynamic_slice_in_dim(h, jax.lax.axis_index(axis_name) * per, per, axis=0)


def _ones(x):
  return jnp.ones((), x.dtype)


def a2a_fir_conv(u: jax.Array, h: jax.Array, core, axis_name: str, n: int) -> jax.Array:
  """Grouped causal FIR (h: [G, K], true convolution) of the zig-zag shard u: [B, 2c, D]."""
  uc = seq_to_channels(u, axis_name, n)
  hr = _rank_groups(h, u.shape[2], axis_name, n, "MR all-to-all")
  ones = jnp.broadcast_to(_ones(uc), uc.shape)
  y = core(uc, ones, ones, hr, None)
  return channels_to_seq(y, axis_name, n)


def a2a_modal_conv(u: jax.Array, log_poles: jax.Array, residues: jax.Array, core,
                   axis_name: str, n: int) -> jax.Array:
  """LI long convolution (poles/residues [D, N_state]) of the zig-zag shard u: [B, 2c, D]."""
  uc = seq_to_channels(u, axis_name, n)
  lp = _rank_groups(log_poles, u.shape[2], axis_name, n, "LI all-to-all")
  rs = _rank_groups(residues, u.shape[2], axis_name, n, "LI all-to-all")
  ones = jnp.broadcast_to(_ones(uc), uc.shape)
  y = core(uc, ones, ones, lp, rs, None)
  return channels_to_seq(y, axis_name, n)


def a2a_gated_fir(x1, v, x2, h, dskip, core, axis_name, n):
  """SE/MR by all-to-all: ``x2 * (h * u + dskip * u)``, u = x1 * v; all [B, 2c, D] zig-zag."""
  return fir.gated_conv(x1, v, x2, lambda u: a2a_fir_conv(u, h, core, axis_name, n), dskip)


def a2a_gated_modal(x1, v, x2, log_poles, residues, dskip, core, axis_name, n):
  """LI by all-to-all: ``x2 * (h_modal * u + dskip * u)``; all [B, 2c, D] zig-zag."""
  return fir.gated_conv(
      x1, v, x2, lambda u: a2a_modal_conv(u, log_poles, residues, core, axis_name, n), dskip)
