"""The tiling of the gated FIR kernels (``fir_conv.py``, ``fir_conv_bwd.py``): block sizes, the
layout of channel tiles, sub-blocks and filter groups, the shared-memory footprint model that
chooses block sizes, and the on-chip Toeplitz gathers both directions use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of one kernel launch.

  chunk: tokens per chunk c (power of two, >= 16, >= K); tile: channels per program;
  width: channels per dot (power of two >= 16, divides tile); seg_chunks: chunks per program
  (upper bound; the launch uses the largest divisor of the chunk count not above it);
  chunk_outer: loop order inside a program — True walks the chunks once and all sub-blocks of
  the tile inside (wide, coalesced rows; all Toeplitz blocks live at once), False walks the
  sub-blocks one after the other (one pair of Toeplitz blocks live).
  """
  chunk: int = 128
  tile: int = 64
  width: int = 16
  seg_chunks: int = 16
  chunk_outer: bool = True
  num_warps: int = 4
  num_stages: int = 2
  rebuild: bool | None = None  # build Toeplitz blocks per chunk; None: only when they don't fit
  prefetch: bool = True  # forward: issue the next chunk's loads before this chunk's dots
  min_programs: int = 0  # > 0: shorter segments (>= 4 chunks) until the grid has this many
  # One group per sub-block, columns masked (see the module docstring); None: when the group size
  # is not a multiple of width and padding it to a power of two wastes at most a third.
  align_groups: bool | None = None


def default_block_sizes(taps: int, backward: bool = False, dtype=jnp.bfloat16) -> BlockSizes:
  """Tuned on an H100 (``benchmarks/fir_conv.py --mode all``) at width 4096, 16 channels per
  group, bf16, L = 16K."""
  if taps <= 32:
    return BlockSizes(chunk=32, tile=64, width=16, seg_chunks=64, num_warps=4, num_stages=2)
  chunk = max(16, 1 << (taps - 1).bit_length())
  if jnp.dtype(dtype) == jnp.float32 and chunk >= 128:
    # float32 dots run on FMA units with [c, c] float32 operands staged in shared memory: one
    # Toeplitz pair at a time, rebuilt per chunk.
    return BlockSizes(chunk=chunk, tile=16, width=16, seg_chunks=16, num_warps=8, num_stages=1,
                      rebuild=True, prefetch=False)
  if backward:
    return BlockSizes(chunk=chunk, tile=16, width=16, seg_chunks=16, num_warps=8, num_stages=1)
  return BlockSizes(chunk=chunk, tile=16, width=16, seg_chunks=32, num_warps=4, num_stages=3,
                    prefetch=False)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static geometry of one launch, derived from shapes and BlockSizes (see ``make_layout``)."""
  bs: BlockSizes       # as launched: tile narrowed to D, width widened to the group (aligned)
  batch: int
  length: int          # L
  channels: int        # D
  groups: int          # G
  taps: int            # K
  group_size: int      # D / G
  padded_length: int   # multiple of chunk
  padded_channels: int  # columns of the padded inputs (every column a program may load)
  seg_chunks: int      # chunks per program (divides padded_length / chunk)
  slots: int           # groups one sub-block may touch (1 when aligned or group_size % width == 0)
  rebuild: bool        # build the Toeplitz blocks per chunk (too many to keep on chip)
  aligned: bool        # one group per sub-block, its columns masked to group_size
  n_tiles: int         # programs along the channels
  itemsize: int        # bytes per element of x1, v, x2

  @property
  def num_chunks(self):
    return self.padded_length // self.bs.chunk

  @property
  def grid(self):
    return (self.batch, self.n_tiles, self.num_chunks // self.seg_chunks)

  @property
  def subblocks(self):
    return self.bs.tile // self.bs.width


# Bytes of Toeplitz blocks a program may keep live before the launcher rebuilds them per chunk.
_LIVE_BUDGET = {False: 96 * 1024, True: 64 * 1024}


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def make_layout(x_shape, h_shape, bs: BlockSizes, itemsize: int = 2,
                backward: bool = False) -> Layout:
  """Check shapes and block sizes (errors name the bad value) and derive the launch geometry."""
  batch, length, channels = x_shape
  groups, taps = h_shape
  c, w = bs.chunk, bs.width
  if channels % groups:
    raise ValueError(f"filter groups G={groups} must divide channels D={channels}")
  if taps > c:
    raise ValueError(f"filter length K={taps} exceeds the chunk c={c}; the two-stage blocked "
                     f"convolution needs K <= c (use BlockSizes(chunk>={taps}))")
  for name, val in (("chunk", c), ("width", w)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"BlockSizes.{name}={val} must be a power of two >= 16")
  if bs.tile % w:
    raise ValueError(f"BlockSizes.tile={bs.tile} must be a multiple of width={w}")
  gs = channels // groups
  aligned = bs.align_groups
  if aligned is None:
    aligned = gs % w != 0 and 3 * max(w, _pow2_at_least(gs)) <= 4 * gs
  aligned = bool(aligned) and gs % w != 0
  tile = bs.tile
  if aligned:  # a sub-block is one group padded to a power of two
    w = max(w, _pow2_at_least(gs))
    tile = max(tile, w)
    while tile > w and (tile // 2) // w * gs >= channels:
      tile //= 2
    n_tiles = -(-groups // (tile // w))
    padded_channels = max(channels, w)  # windows past the last column shift left (subblock)
  else:
    # Narrow the tile for small D so that padding stays small.
    while tile > w and tile // 2 >= channels:
      tile //= 2
    padded_channels = -(-channels // tile) * tile
    n_tiles = padded_channels // tile
  bs = dataclasses.replace(bs, tile=tile, width=w, align_groups=aligned)
  num_chunks = -(-length // c)
  seg = max(d for d in range(1, min(bs.seg_chunks, num_chunks) + 1) if num_chunks % d == 0)
  # Short sequences: more, shorter segments so that the grid fills the GPU (132 SMs).
  programs = lambda s_: batch * n_tiles * (num_chunks // s_)  # noqa: E731
  while programs(seg) < bs.min_programs and seg > 4:
    seg = max(d for d in range(1, seg) if num_chunks % d == 0)
  if aligned or gs % w == 0:
    slots = 1
  else:  # the most groups any width-aligned sub-block of real channels touches
    starts = np.arange(0, channels, w)
    first = starts // gs
    last = np.minimum(starts + w, channels) - 1
    slots = int((last // gs - first).max()) + 1
  # Odd group sizes multiply the live Toeplitz blocks by the slots: walk the sub-blocks one by
  # one, and if even one sub-block's blocks do not fit, rebuild them per chunk (slow, rare).
  per_sub = slots * 2 * c * c * itemsize
  budget = _LIVE_BUDGET[backward]
  if bs.chunk_outer and per_sub * (tile // w) > budget and slots > 1:
    bs = dataclasses.replace(bs, chunk_outer=False)
  rebuild = per_sub > budget if bs.rebuild is None else bs.rebuild
  return Layout(bs, batch, length, channels, groups, taps, gs, num_chunks * c, padded_channels,
                seg, slots, rebuild, aligned, n_tiles, itemsize)


# ----------------------------------------------------------------------------- resources

# Hopper: 227 KiB of shared memory per block (the opt-in maximum; what XLA reports as available).
SMEM_LIMIT = 232448


class DoesNotFit(ValueError):
  """No block configuration of the FIR kernels fits this geometry on the device."""


@dataclasses.dataclass(frozen=True)
class Footprint:
  smem: int            # bytes of shared memory per program (block)
  regs: int            # estimated 32-bit registers per thread for the live on-chip values


def footprint(lay: Layout, backward: bool = False) -> Footprint:
  """Shared memory and registers of one launch of ``lay``, as the Triton compiler lays it out.

  With T = 2 * slots * c * c elements of Toeplitz blocks per sub-block, R = c * width * itemsize
  bytes per row tile, n sub-blocks per program and P = num_stages - 1:
    bf16 forward      T * 2 * n + P * 3R * n + 4cw     the Toeplitz operands of the tensor-core
                      (rebuild: P * (4T + 3R) * n;       dots, and P buffers of every load of a
                      2T + 3R * n when P = 0)            chunk (x1, v, x2; the float32 gathers of
                                                         the filter table when rebuilt per chunk)
    f32 forward       T * 4 * n + (1 + 2P) * R * n     FMA dots stage their operands; their loads
                                                         are not multi-buffered
    bf16 backward     T * 2 * n + 4c^2 * slots + 5R * n  plus the [c, c] float32 conversion of
                                                         the dh partials; loads prefetched by hand
    f32 backward      T * 4 * n + 3R * n
  The sequential sub-block loop (``chunk_outer=False``) is counted like the chunk-outer one: the
  compiler does not reuse the loops' buffers. Fitted to the sizes the compiler reports on an H200
  (``benchmarks/fir_smem.py``; ``benchmarks/fir_smem_h200.jsonl``): within 35% for the MR kernels,
  an upper bound elsewhere (``tests/test_pallas_fir.py`` checks both). Registers: the float32
  accumulators and row tiles live per thread (an estimate; the compiler caps at 255 and spills).
  """
  bs = lay.bs
  c, w, e = bs.chunk, bs.width, lay.itemsize
  p = max(0, bs.num_stages - 1)
  n = lay.subblocks
  t = 2 * lay.slots * c * c
  r = c * w * e
  if not backward and e == 2:
    if lay.rebuild:
      smem = p * (4 * t + 3 * r) * n if p else 2 * t + 3 * r * n
    else:
      smem = 2 * t * n + p * 3 * r * n + 4 * c * w
  elif not backward:
    smem = 4 * t * n + (1 + 2 * p) * r * n
  elif e == 2:
    smem = 2 * t * n + 4 * c * c * lay.slots + 5 * r * n
  else:
    smem = 4 * t * n + 3 * r * n
  threads = 32 * bs.num_warps
  acc = c * w * 4 * (2 if backward else 1) * n + (lay.slots * c * c * 4 if backward else 0)
  regs = (acc + (6 if backward else 3) * r * n) // (4 * threads)
  return Footprint(int(smem), int(regs))


def candidates(taps: int, backward: bool, dtype) -> list[BlockSizes]:
  """Block configurations of a geometry, fastest first: the tuned default, then shallower
  pipelines, one sub-block at a time, Toeplitz blocks rebuilt per chunk, each with the
  sub-block layout ``make_layout`` picks and then the other two (aligned, slots). Order from
  ``benchmarks/fir_smem.py --mode time`` on an H200 (evo2_1b / evo2_7b widths, 16K, bf16):
  fewer stages cost 0-1%, the sequential sub-block loop up to 40%, rebuilding up to 65%."""
  base = default_block_sizes(taps, backward, dtype)
  out = []
  for rebuild in (base.rebuild, True):
    for outer in (base.chunk_outer, False):
      for stages in sorted({base.num_stages, 2, 1}, reverse=True):
        for align in (None, True, False):
          bs = dataclasses.replace(base, align_groups=align, num_stages=stages,
                                   chunk_outer=outer, rebuild=rebuild)
          if bs not in out:
            out.append(bs)
  return out


def choose_block_sizes(x_shape, h_shape, dtype, backward: bool = False,
                       smem_limit: int | None = None) -> BlockSizes:
  """The first candidate (fastest first) whose footprint fits ``smem_limit``; ``DoesNotFit``
  names the geometry and the smallest footprint when none does."""
  itemsize = jnp.dtype(dtype).itemsize
  smem_limit = SMEM_LIMIT if smem_limit is None else smem_limit
  groups, taps = h_shape
  best = None
  for bs in candidates(taps, backward, dtype):
    fp = footprint(make_layout(x_shape, h_shape, bs, itemsize, backward), backward)
    if fp.smem <= smem_limit:
      return bs
    best = fp.smem if best is None else min(best, fp.smem)
  raise DoesNotFit(
      f"no block configuration of the gated FIR {'backward' if backward else 'forward'} kernel "
      f"fits D={x_shape[2]}, G={groups} ({x_shape[2] // groups} channels per group), K={taps}, "
      f"{jnp.dtype(dtype).name}: the smallest needs {best} bytes of shared memory, the device "
      f"allows {smem_limit}")


# ----------------------------------------------------------------------------- helpers


def filter_table(h: jax.Array, chunk: int) -> jax.Array:
  """[G, K] -> [G, 3c] float32 with c zeros in front and zeros after the taps, so that the
  Toeplitz gathers ``H0[i, i'] = table[c + i - i']``, ``H1[i, i'] = table[2c + i - i']`` are
  always in bounds and need no mask."""
  groups, taps = h.shape
  return jnp.pad(h.astype(jnp.float32), ((0, 0), (chunk, 2 * chunk - taps)))


def toeplitz(table_ref, g, offset: int, chunk: int, dtype, transpose: bool = False):
  """Gather the [c, c] block ``T[i, i'] = table[g, offset + i - i']`` (or its transpose)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  diff = (cols - rows) if transpose else (rows - cols)
  return table_ref[g, offset + diff].astype(dtype)


def toeplitz_slots(table_ref, lay: Layout, gids, col_mask, dtype):
  """Per slot (H0, H1, column mask or None); callables that build them when ``lay.rebuild``.
  ``col_mask``: None (one filter for all columns), per-column group ids (slots: a slot keeps the
  columns of its group), or a [1, width] bool (aligned: the columns of the one group)."""
  c = lay.bs.chunk
  out = []
  for g in gids:
    def build(g=g):
      gc = jnp.minimum(g, lay.groups - 1)
      if lay.aligned:
        mask = col_mask
      else:
        mask = None if lay.slots == 1 else (col_mask == g)
      return (toeplitz(table_ref, gc, c, c, dtype), toeplitz(table_ref, gc, 2 * c, c, dtype),
              mask)
    out.append(build if lay.rebuild else build())
  return out


def subblock(lay: Layout, tile_index, s: int):
  """Sub-block s of channel tile ``tile_index``: (first column, column mask for loads' results
  and stores or None, group ids (unclamped) of its slots, the mask argument of
  ``toeplitz_slots``)."""
  w = lay.bs.width
  if lay.aligned:
    # The window starts at the group's first column, or ends at the last column of the array
    # (no channel padding); the mask keeps the group's columns.
    g = tile_index * lay.subblocks + s
    first = g * lay.group_size
    start = jnp.minimum(first, lay.padded_channels - w)
    lane = start + jax.lax.broadcasted_iota(jnp.int32, (1, w), 1)
    mask = (lane >= first) & (lane < first + lay.group_size) & (g < lay.groups)
    return start, mask, [g], mask
  ds = tile_index * lay.bs.tile + s * w
  col_group = (ds + jax.lax.broadcasted_iota(jnp.int32, (1, w), 1)) // lay.group_size
  first = ds // lay.group_size
  return ds, None, [first + j for j in range(lay.slots)], col_group


def pad_to(x: jax.Array, lay: Layout) -> jax.Array:
  pl_, pd = lay.padded_length - x.shape[1], lay.padded_channels - x.shape[2]
  return jnp.pad(x, ((0, 0), (0, pl_), (0, pd))) if (pl_ or pd) else x
