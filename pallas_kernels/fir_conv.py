"""Gated grouped FIR convolution as a two-stage blocked Pallas (Triton) kernel, with its reference.

    y = x2 * (h * u + dskip * u),   u = x1 * v,   causal, per channel

x1, v, x2: [B, L, D] (bf16 or f32); h: [G, K] grouped filters in true-convolution orientation
(``h[:, 0]`` multiplies the current token; filter g serves channels g*D/G … (g+1)*D/G - 1);
dskip: [D] or None. Float32 accumulation, y in the input dtype.

Algorithm (SPEC "two-stage blocked convolution"): cut L into chunks of c >= K tokens. The causal
Toeplitz operator is block-bidiagonal, ``Y_j = H0 U_j + H1 U_{j-1}`` with
``H0[i, i'] = h[i - i']`` and ``H1[i, i'] = h[i + c - i']`` (zero outside 0..K-1). A program
owns a tile of ``tile`` channels and ``seg_chunks`` consecutive chunks of one batch row; it builds
H0/H1 on chip once (a gather from the tiny filter table) and runs two tensor-core dots per chunk,
with the gates fused so u and h*u never touch HBM.

Groups: a filter's Toeplitz blocks are shared only by the channels of its group, so the dots run
on sub-blocks of ``width`` channels (>= 16, the smallest tensor-core N). When the group size is a
multiple of ``width`` a sub-block has one filter. Otherwise there are two layouts: *aligned* —
each sub-block holds exactly one group, its columns padded to ``width`` by a mask (Evo 2 1B: 15
channels per group in 16 columns; 1/15 more columns read, no more dots); or *slots* — width-aligned
sub-blocks do one dot per group they touch and keep that group's columns (more FLOPs and more
Toeplitz blocks on chip, same bytes; for group sizes far from a power of two, e.g. 1 or 3).

Resources: Triton stages dot operands and pipelined loads in shared memory (227 KiB per block on
Hopper), which the interpreter does not model. ``footprint`` estimates a launch's shared memory
and registers from its Layout; ``choose_block_sizes`` walks the candidates of a geometry, fastest
first, and takes the first that fits, or raises ``DoesNotFit`` (``dispatch`` then falls back to
XLA with a warning when the implementation was ``auto``).

The backward kernels live in ``fir_conv_bwd.py``; ``gated_fir_conv`` ties both together through
``jax.custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sh2_jax import conv

_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


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


def dot_precision(dtype):
  # float32 inputs get full-precision FMA dots (Triton's default would be tf32, ~3e-4 error).
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, precision, trans_b: bool = False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


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


def store(ref, idx, val, mask):
  """``ref[idx] = val``, only the columns where ``mask`` [1, w] holds (None: all)."""
  if mask is None:
    ref[idx] = val
  else:
    plgpu.store(ref.at[idx], val, mask=jnp.broadcast_to(mask, val.shape))


def pad_to(x: jax.Array, lay: Layout) -> jax.Array:
  pl_, pd = lay.padded_length - x.shape[1], lay.padded_channels - x.shape[2]
  return jnp.pad(x, ((0, 0), (0, pl_), (0, pd))) if (pl_ or pd) else x


def call_pallas(kernel, out_shape, grid, bs: BlockSizes, interpret: bool, name: str, poison: bool,
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
    warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, input_output_aliases=aliases,
        interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    )(*args)


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(table_ref, skip_ref, x1_ref, v_ref, x2_ref, y_ref, *, lay: Layout,
                has_skip: bool, precision):
  bs = lay.bs
  c, w = bs.chunk, bs.width
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first = si * lay.seg_chunks
  dtype = x1_ref.dtype

  # Per sub-block: Toeplitz blocks per slot (built once), slot masks, skip column, u of the
  # chunk before this program's first chunk (zero at the sequence start).
  subs = []
  for s in range(lay.subblocks):
    start, colmask, gids, slot_mask = subblock(lay, ti, s)
    cols = pl.ds(start, w)
    mats = toeplitz_slots(table_ref, lay, gids, slot_mask, dtype)
    skip = skip_ref[cols].astype(jnp.float32)[None, :] if has_skip else None
    subs.append((cols, mats, skip, colmask))

  last_chunk = lay.num_chunks - 1

  def load(chunk, cols, refs):
    rows = pl.ds(jnp.minimum(chunk, last_chunk) * c, c)
    return tuple(r[b, rows, cols] for r in refs)

  def init(s):
    cols = subs[s][0]
    x1p, vp = load(jnp.maximum(first - 1, 0), cols, (x1_ref, v_ref))
    u_prev = jnp.where(first > 0, x1p * vp, jnp.zeros_like(x1p))
    if not bs.prefetch:
      return (u_prev,)
    return (u_prev,) + load(first, cols, (x1_ref, v_ref, x2_ref))

  def step(k, carry, s):
    # With prefetch, the loads of chunk k+1 are issued before chunk k's dots (a software
    # pipeline by hand: Triton pipelines only loads that feed dots directly).
    cols, mats, skip, colmask = subs[s]
    if bs.prefetch:
      u_prev, x1, v, x2 = carry
      nxt = load(first + k + 1, cols, (x1_ref, v_ref, x2_ref))
    else:
      (u_prev,), nxt = carry, ()
      x1, v, x2 = load(first + k, cols, (x1_ref, v_ref, x2_ref))
    u = x1 * v
    acc = None
    for h0, h1, mask in (m() if callable(m) else m for m in mats):
      p = dot(h0, u, precision) + dot(h1, u_prev, precision)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      acc = p if acc is None else acc + p
    if skip is not None:
      acc = acc + skip * u.astype(jnp.float32)
    store(y_ref, (b, pl.ds((first + k) * c, c), cols),
          (x2.astype(jnp.float32) * acc).astype(y_ref.dtype), colmask)
    return (u,) + nxt

  if bs.chunk_outer:
    def body(k, carries):
      return tuple(step(k, carries[s], s) for s in range(lay.subblocks))
    jax.lax.fori_loop(0, lay.seg_chunks, body, tuple(init(s) for s in range(lay.subblocks)))
  else:
    for s in range(lay.subblocks):
      jax.lax.fori_loop(0, lay.seg_chunks, functools.partial(step, s=s), init(s))


def fwd(x1, v, x2, h, dskip, bs: BlockSizes, interpret: bool = False, poison: bool = False):
  """The forward launch; arguments as ``gated_fir_conv`` (dskip may be None)."""
  lay = make_layout(x1.shape, h.shape, bs, jnp.dtype(x1.dtype).itemsize)
  table = filter_table(h, lay.bs.chunk)
  skip = (jnp.zeros((lay.padded_channels,), jnp.float32) if dskip is None else
          jnp.pad(dskip.astype(jnp.float32), (0, lay.padded_channels - lay.channels)))
  xs = [pad_to(a, lay) for a in (x1, v, x2)]
  kernel = functools.partial(_fwd_kernel, lay=lay, has_skip=dskip is not None,
                             precision=dot_precision(x1.dtype))
  out_shape = (jax.ShapeDtypeStruct(xs[0].shape, x1.dtype),)
  (y,) = call_pallas(kernel, out_shape, lay.grid, lay.bs, interpret, "gated_fir_fwd", poison,
                     table, skip, *xs)
  return y[:, :lay.length, :lay.channels]


# ----------------------------------------------------------------------------- public op


def _check(x1, v, x2, h, dskip):
  if x1.ndim != 3 or x1.shape != v.shape or x1.shape != x2.shape:
    raise ValueError(f"x1, v, x2 must share one shape [B, L, D]; got {x1.shape}, {v.shape}, "
                     f"{x2.shape}")
  if not (x1.dtype == v.dtype == x2.dtype) or x1.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x1, v, x2 must all be bfloat16 or float32; got {x1.dtype}, {v.dtype}, "
                     f"{x2.dtype}")
  if h.ndim != 2:
    raise ValueError(f"h must be [G, K]; got shape {h.shape}")
  if dskip is not None and dskip.shape != (x1.shape[2],):
    raise ValueError(f"dskip must be [D]=[{x1.shape[2]}]; got shape {dskip.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gated_fir(x1, v, x2, h, dskip, opts):
  bs_fwd, _, has_skip, interpret, poison = opts
  return fwd(x1, v, x2, h, dskip if has_skip else None, bs_fwd, interpret, poison)


def _gated_fir_fwd(x1, v, x2, h, dskip, opts):
  return _gated_fir(x1, v, x2, h, dskip, opts), (x1, v, x2, h, dskip)


def _gated_fir_bwd(opts, res, dy):
  from pallas_kernels import fir_conv_bwd  # the backward kernels; imported late to avoid a cycle
  _, bs_bwd, has_skip, interpret, poison = opts
  x1, v, x2, h, dskip = res
  dx1, dv, dx2, dh, dd = fir_conv_bwd.bwd(x1, v, x2, h, dskip if has_skip else None, dy, bs_bwd,
                                          interpret, poison)
  return dx1, dv, dx2, dh.astype(h.dtype), dd.astype(dskip.dtype)


_gated_fir.defvjp(_gated_fir_fwd, _gated_fir_bwd)


def gated_fir_conv(x1: jax.Array, v: jax.Array, x2: jax.Array, h: jax.Array,
                   dskip: jax.Array | None = None, *, interpret: bool = False,
                   block_sizes: BlockSizes | None = None,
                   bwd_block_sizes: BlockSizes | None = None, poison: bool = False) -> jax.Array:
  """``x2 * (h * (x1 * v) + dskip * (x1 * v))``, causal, by the two-stage blocked kernels.

  x1, v, x2: [B, L, D] bf16 or f32; h: [G, K] (true convolution, G divides D, K <= chunk);
  dskip: [D] or None. Returns [B, L, D] in the input dtype; differentiable in all arrays.
  ``interpret`` runs the kernels in the Pallas interpreter (CPU tests); ``poison`` makes the
  outputs start as NaN (tests). Block sizes default to ``choose_block_sizes`` (the fastest that
  fits shared memory); ``DoesNotFit`` when none does.
  """
  _check(x1, v, x2, h, dskip)
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"gated_fir_conv runs its Pallas kernels on a GPU, but JAX runs on "
                     f"{jax.default_backend()!r}; pass interpret=True (slow, for tests) or use "
                     f"sh2_jax.conv.gated_conv")
  if block_sizes is not None:  # explicit block sizes: their errors first
    make_layout(x1.shape, h.shape, block_sizes, jnp.dtype(x1.dtype).itemsize)
  bs_f = block_sizes or choose_block_sizes(x1.shape, h.shape, x1.dtype)
  bs_b = bwd_block_sizes or choose_block_sizes(x1.shape, h.shape, x1.dtype, backward=True)
  has_skip = dskip is not None
  if dskip is None:
    dskip = jnp.zeros((x1.shape[2],), jnp.float32)
  return _gated_fir(x1, v, x2, h, dskip, (bs_f, bs_b, has_skip, interpret, poison))


def gated_fir_conv_reference(x1, v, x2, h, dskip=None):
  """The same function through the one definition of the math (XLA grouped convolution)."""
  return conv.gated_conv(x1, v, x2, functools.partial(conv.fir_conv, h=h), dskip)
