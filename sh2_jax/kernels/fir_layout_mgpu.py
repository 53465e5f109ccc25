"""The tiling and shared building blocks of the Mosaic GPU gated FIR kernels
(``fir_conv_mgpu.py`` forward and public op, ``fir_conv_mgpu_bwd.py`` backward; the algorithm and
the interpret-mode notes are in ``fir_conv_mgpu.py``): block sizes, the launch geometry and what
it cannot run, the shared-memory estimate, the Toeplitz band blocks, and the in-kernel pieces
both directions use (the prologue's TMA batch, window slots and slides, the streamed BlockSpecs,
staged stores, the launch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sh2_jax.kernels.fir_layout import SMEM_LIMIT  # Hopper's per-block limit, one definition

MAX_BANDS = 2            # K <= 2c + 1: the MR filters (128 taps) at c = 64
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MgpuBlockSizes:
  """chunk: tokens per chunk c (64 or 128; the wgmma M); width: channels per channel tile w (16,
  32, 64 or 128; divides the group size; the wgmma N); seg_chunks: chunks per program (upper
  bound); stages: input pipeline depth (``max_concurrent_steps``).

  The variants (``benchmarks/fir_conv.py --mode mgpu_variants`` times them):
  tiles: channel tiles per program (several groups per program: band blocks and windows per
  tile, their wgmmas issued back to back, so a step's fixed latencies — barrier wait, wgmma
  wait, store wait — are paid once for ``tiles`` tiles and the grid is ``tiles`` times smaller;
  the backward holds ``tiles * (n+1)`` [c, c] float32 dh accumulators in registers, and shared
  memory grows with the tiles: programs per SM fall).
  ring: the windows are rings of n + 1 chunk slots (chunk q in slot q mod (n+1), the wgmma of
  lag m reads its slot) instead of sliding by one chunk in shared memory after every step.
  store_slots: staged output buffers per output (1: a step waits for the previous step's copies
  out before writing its own; 2: double-buffered, it waits only for those of two steps back).
  wide: each streamed array moves as one [c, tiles * w] TMA box per step (rows of 2 tiles w
  bytes, unswizzled shared memory; each tile reads its column slice) instead of one swizzled
  [c, w] box per tile (32-byte rows at w = 16); the staged outputs likewise.
  """
  chunk: int = 64
  width: int = 16
  seg_chunks: int = 32
  stages: int = 2
  tiles: int = 1
  ring: bool = False
  store_slots: int = 1
  wide: bool = False


def bands(taps: int, chunk: int) -> int:
  """n: the past chunks one output chunk reads (at least 1)."""
  return max(1, -(-(taps - 1) // chunk))


def tail_depth(taps: int, chunk: int, width: int) -> int:
  """k: the columns of the last band H_n that can be nonzero (``H_n[i, i']`` needs ``i' - i >=
  n c - K + 1``: only its top-right k x k corner, k = K - 1 - (n-1)c), rounded up to the channel
  tile's swizzle row (16 at w = 16) and at most c. SE: 16 of 64, so the last band's wgmmas and
  its block in shared memory shrink 4x; MR: the whole block."""
  n = bands(taps, chunk)
  granule = plgpu.find_swizzle(width * 16) // 2
  return min(chunk, -(-max(taps - 1 - (n - 1) * chunk, 1) // granule) * granule)


def p_pieces(chunk: int, n: int, k: int, m: int):
  """(first column, width) of the dh accumulators of lag m: [c, c/2] halves (half the staging
  buffer of a whole block), the last band only over its k columns."""
  half = chunk // 2
  return [(s, min(half, chunk - s)) for s in range(0 if m < n else chunk - k, chunk, half)]


def smem_bytes(bs: MgpuBlockSizes, taps: int, backward: bool = False) -> int:
  """Shared memory of one program (bf16 operands, float32 partials), as allocated below: the
  buffers that live through the program, plus the largest of the scoped ones (the halo staging,
  the input pipeline, the backward's staged partials at the end), which share one region."""
  c, w, s = bs.chunk, bs.width, bs.stages
  n1 = bands(taps, c) + 1
  t = bs.tiles
  tile = c * w * 2  # the wide layout has the same bytes, in one buffer per array
  k = tail_depth(taps, c, w)
  band = t * ((n1 - 1) * c * c + c * k) * 2  # H_0 … H_{n-1}, and H_n's k columns
  skip = t * c * w * 4
  halo = (2 if backward else 1) * t * (n1 - 1) * 2 * tile  # the prologue's: x1 v (and dy x2)
  if not backward:  # band rows, u windows, staged y; dskip rows and halo, or pipelined x1 v x2
    return band + t * n1 * tile + bs.store_slots * t * tile + max(skip + halo, s * 3 * t * tile)
  # band rows, windows of u, dz, x2 and dy, staged dx2 dx1 dv; dskip rows and halo, or
  # pipelined x1 v x2' dy', or a [c, c/2] piece of the dh partial and the ddskip partial (f32)
  band += t * k * c * 2 if k < c else 0  # H_n's k rows (du); else the whole block serves both
  widths = {width for m in range(n1) for _, width in p_pieces(c, n1 - 1, k, m)}
  return (band + 4 * t * n1 * tile + bs.store_slots * 3 * t * tile
          + max(skip + halo, s * 4 * t * tile, sum(c * wd * 4 for wd in widths) + c * w * 4))


def default_block_sizes(group_size: int, taps: int, backward: bool = False,
                        channels: int | None = None) -> MgpuBlockSizes:
  """The forward's (or ``backward``'s) block sizes: chunk 64, the widest channel tile that
  divides the group and fits the backward's shared memory, and at the 16-channel tile (every
  Evo 2 preset's group) the variants measured fastest per direction and filter length
  (H200, D 4096, bf16, at 16K, 64K and 128K; RESULTS, "FIR defaults at 16K-128K"): the
  forward four tiles per program in wide boxes, ring windows, 3 stages, 128-chunk programs (SE
  0.192 / 1.45 ms, MR 0.204 / 1.51 ms at 16K / 128K: 85-90% of the floor; two tiles fell from
  80% to 69% with length; four take 136 KiB (SE) / 200 KiB (MR) of shared memory, one program
  per SM, and stream 4x wider boxes per step); the SE backward (one past chunk) two tiles, ring,
  two store slots, 128-chunk programs; the MR backward (two past chunks: two tiles halve its
  programs per SM) one tile, ring, 3 stages, 512-chunk programs (its dh partials, one per
  program, shrink: 1.4x faster at 128K than 128-chunk programs). Four (two) tiles need a tile
  count divisible by four (two): otherwise two or one; with ``channels`` unknown, one."""
  base = MgpuBlockSizes(chunk=64, width=16)
  for w in (64, 32, 16):
    bs = MgpuBlockSizes(chunk=64, width=w)
    if group_size % w == 0 and smem_bytes(bs, taps, backward=True) <= SMEM_LIMIT:
      base = bs
      break
  if base.width != 16:
    return base  # not measured: the first choice
  n_tiles = channels // 16 if channels is not None else 1
  two = 2 if n_tiles % 2 == 0 else 1
  if not backward:
    four = 4 if n_tiles % 4 == 0 else two
    return dataclasses.replace(base, tiles=four, wide=four > 1, ring=True, stages=3,
                               seg_chunks=128)
  if bands(taps, base.chunk) == 1:
    return dataclasses.replace(base, tiles=two, wide=two > 1, ring=True, store_slots=2,
                               seg_chunks=128)
  return dataclasses.replace(base, ring=True, stages=3, seg_chunks=512)


@dataclasses.dataclass(frozen=True)
class Geometry:
  batch: int
  length: int
  channels: int
  groups: int
  taps: int
  chunk: int
  width: int
  seg_chunks: int   # chunks per program
  n_segs: int       # programs along the sequence
  stages: int
  tiles: int        # channel tiles per program
  ring: bool
  store_slots: int
  wide: bool

  @property
  def bands(self):
    return bands(self.taps, self.chunk)

  @property
  def tail(self):
    """k: the columns of the last band that can be nonzero (``tail_depth``)."""
    return tail_depth(self.taps, self.chunk, self.width)

  @property
  def padded_length(self):
    return self.n_segs * self.seg_chunks * self.chunk

  @property
  def last(self):
    return self.padded_length // self.chunk - 1

  @property
  def n_tiles(self):
    return self.channels // self.width

  @property
  def n_progs(self):
    """Programs along the channels."""
    return self.n_tiles // self.tiles

  @property
  def tiles_per_group(self):
    return (self.channels // self.groups) // self.width


def mgpu_misfit(x_shape, h_shape, dtype, bs: MgpuBlockSizes | None = None,
                backward: bool = True, bwd_bs: MgpuBlockSizes | None = None) -> str | None:
  """Why these kernels (the forward with ``bs``, and with ``backward`` its gradient too, with
  ``bwd_bs``: by default ``bs``, or both the defaults) cannot run this geometry, or None when
  they can."""
  _, _, d = x_shape
  groups, taps = h_shape
  if jnp.dtype(dtype) != jnp.bfloat16:
    return f"the Mosaic GPU FIR kernels take bfloat16 inputs, not {jnp.dtype(dtype).name}"
  if groups < 1 or d % groups:
    return f"filter groups {groups} do not divide channels {d}"
  gs = d // groups
  bwd_bs = bwd_bs or bs or default_block_sizes(gs, taps, backward=True, channels=d)
  bs = bs or default_block_sizes(gs, taps, channels=d)
  for b, bwd in [(bs, False)] + ([(bwd_bs, True)] if backward else []):
    if b.chunk not in (64, 128):
      return f"chunk {b.chunk} is not 64 or 128"
    if bands(taps, b.chunk) > MAX_BANDS:
      return (f"filter length {taps} exceeds {MAX_BANDS * b.chunk + 1} taps (chunk {b.chunk}, "
              f"at most {MAX_BANDS} past chunks)")
    if b.width not in (16, 32, 64, 128) or gs % b.width:
      return (f"group size {gs} (channels {d} / groups {groups}) is not a multiple of the "
              f"channel tile {b.width}; the Mosaic GPU kernels need a multiple of 16")
    if b.tiles < 1 or (d // b.width) % b.tiles:
      return (f"tiles={b.tiles} does not divide the {d // b.width} channel tiles of width "
              f"{b.width} (channels {d})")
    if b.store_slots not in (1, 2):
      return f"store_slots {b.store_slots} is not 1 or 2"
    if b.wide and b.tiles * b.width > 256:
      return (f"wide boxes of {b.tiles} tiles x {b.width} channels exceed TMA's 256 elements a "
              f"box row")
    if smem_bytes(b, taps, bwd) > SMEM_LIMIT:
      return (f"block sizes {b} need {smem_bytes(b, taps, bwd)} bytes of shared memory "
              f"({'backward' if bwd else 'forward'}) for {taps} taps, over {SMEM_LIMIT}")
  return None


def geometry(x_shape, h_shape, bs: MgpuBlockSizes) -> Geometry:
  b, length, d = x_shape
  groups, taps = h_shape
  chunks = -(-length // bs.chunk)
  n_segs = -(-chunks // bs.seg_chunks)
  seg = -(-chunks // n_segs)  # balanced: padding below one chunk per segment
  return Geometry(b, length, d, groups, taps, bs.chunk, bs.width, seg, n_segs, bs.stages,
                  bs.tiles, bs.ring, bs.store_slots, bs.wide)


def band_rows(h, c: int, n: int):
  """[G, K] -> the Toeplitz blocks ``H_m`` [G, n+1, c, c] bfloat16 indexed by the lag m,
  ``H_m[i, i'] = h[i + m c - i']`` (the backward reads them transposed: wgmma's transposed A)."""
  groups, taps = h.shape
  table = jnp.pad(h.astype(f32), ((0, 0), (c, (n + 2) * c - taps)))  # table[g, c + d] = h[g, d]
  diff = np.arange(c)[:, None] - np.arange(c)[None, :]  # i - i'
  return jnp.stack([table[:, c + m * c + diff] for m in range(n + 1)], axis=1).astype(jnp.bfloat16)


def swizzled(minor: int, dtype=jnp.bfloat16):
  """Shared-memory tiling + swizzle for a wgmma operand whose last dimension is ``minor``."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def smem(shape, minor=None, dtype=jnp.bfloat16):
  """A bf16 shared-memory buffer swizzled for a last dimension of ``minor`` (default its own):
  the operands of one wgmma must share one swizzle, so the band rows take the channel tile's."""
  return plgpu.SMEM(shape, dtype, transforms=swizzled(minor or shape[-1], dtype))


def pad(a, geo: Geometry):
  return jnp.pad(a, ((0, 0), (0, geo.padded_length - geo.length), (0, 0)))


def skip_rows(dskip, geo: Geometry):
  """dskip [D] -> [c, D] float32: broadcast over a chunk's rows once, in XLA, so that a [c, w]
  tile of it is read like any other operand."""
  skip = jnp.zeros((geo.channels,), f32) if dskip is None else dskip.astype(f32)
  return jnp.broadcast_to(skip[None, :], (geo.chunk, geo.channels))


def program(geo: Geometry):
  """(batch row, first chunk, [(tile, group, column slice)] of each channel tile) of this
  program; its tiles are consecutive."""
  b, p, s = (jax.lax.axis_index(n) for n in ("batch", "tile", "seg"))
  tiles = []
  for i in range(geo.tiles):
    t = p * geo.tiles + i
    tiles.append((t, t // geo.tiles_per_group, pl.ds(t * geo.width, geo.width)))
  return b, s * geo.seg_chunks, tiles


def slot(geo: Geometry, j, d: int, ahead: bool = False):
  """The window slot of chunk ``j + d`` at the step of chunk j. Sliding windows keep the past
  chunks j-n … j in slots 0 … n (``ahead``: j … j+n); a ring keeps chunk q in slot q mod (n+1)
  (``j + d + n + 1 > 0``: chunks start at -n)."""
  n = geo.bands
  if geo.ring:
    return jax.lax.rem(j + d + n + 1, n + 1)
  return d if ahead else n + d


def fetch(copies, bars):
  """TMA copies (src GMEM ref, dst SMEM ref), one barrier each, then wait for all."""
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[i])


def fetch_all(copies):
  pl.run_scoped(functools.partial(fetch, copies), plgpu.Barrier(num_barriers=len(copies)))


def product(a, b):
  return a * b


def first_arg(a, b):
  del b
  return a


def second_arg(a, b):
  del a
  return b


def band_copies(geo: Geometry, tiles, band_gmem, band_smem, tail_f, tail_b=None):
  """The TMA copies of the program's band blocks ([G, n+1, c, c] in HBM): H_0 … H_{n-1} of each
  tile's group into ``band_smem`` [tiles, n, c, c], the k columns H_n[:, c-k:] into ``tail_f``
  [tiles, c, k] (the forward's), and with ``tail_b`` the k rows H_n[:k] into it [tiles, k, c]
  (du's; for k = c the backward reads ``tail_f`` transposed instead)."""
  c, n, k = geo.chunk, geo.bands, geo.tail
  copies = []
  for i, (_, g, _) in enumerate(tiles):
    copies += [(band_gmem.at[g, m], band_smem.at[i, m]) for m in range(n)]
    copies.append((band_gmem.at[g, n, :, pl.ds(c - k, k)], tail_f.at[i]))
    if tail_b is not None:
      copies.append((band_gmem.at[g, n, pl.ds(0, k)], tail_b.at[i]))
  return copies


def band_a(geo: Geometry, band_smem, tail_f, i: int, m: int):
  """The A operand of lag m for tile i, z += A @ U_{j-m}[past_rows(m)]: H_m [c, c], or for
  m = n its k nonzero columns [c, k]."""
  return band_smem.at[i, m] if m < geo.bands else tail_f.at[i]


def band_at(geo: Geometry, band_smem, tail_b, i: int, m: int):
  """The A operand of lag m for du += A @ dz_{j+m}[ahead_rows(m)]: H_m^T, read transposed
  (for m = n from ``tail_b``, [k, c] -> [c, k])."""
  return (band_smem.at[i, m] if m < geo.bands else tail_b.at[i]).transpose((1, 0))


def past_rows(geo: Geometry, m: int):
  """The rows of U_{j-m} that band m reads: all, or for m = n the last k."""
  c, k = geo.chunk, geo.tail
  return pl.ds(0, c) if m < geo.bands else pl.ds(c - k, k)


def ahead_rows(geo: Geometry, m: int):
  """The rows of dz_{j+m} that band m's transpose reads: all, or for m = n the first k."""
  return pl.ds(0, geo.chunk) if m < geo.bands else pl.ds(0, geo.tail)


def prologue(geo: Geometry, b, tiles, copies, skip_gmem, fills):
  """A program's start, as one batch of TMA copies and one wait (not a round trip each): the
  band blocks ``copies`` (``band_copies``), the dskip rows of its tiles (unless
  ``skip_gmem`` is None), and the halo: each fill ``(a_gmem, b_gmem, cols, chunk, dsts, fns)``
  writes ``fn(a, b)`` (float32) of chunk ``chunk`` into each window slot of ``dsts``, zero for a
  chunk outside 0..last (the n chunks of past u before the first; in the backward also the n
  chunks of future dz and dy). Returns each tile's dskip rows [c, w] float32 as register values
  for the whole program, or None. Its staging buffers are scoped, so the input pipeline reuses
  that shared memory."""
  c, w = geo.chunk, geo.width

  def run(skip_buf, halo):
    batch = list(copies)
    if skip_gmem is not None:
      batch += [(skip_gmem.at[:, cols], skip_buf.at[i]) for i, (_, _, cols) in enumerate(tiles)]
    for q, (a_gmem, b_gmem, cols, chunk, _, _) in enumerate(fills):
      rows = pl.ds(jnp.clip(chunk, 0, geo.last) * c, c)
      batch += [(a_gmem.at[b, rows, cols], halo.at[q, 0]),
                (b_gmem.at[b, rows, cols], halo.at[q, 1])]
    fetch_all(batch)
    for q, (_, _, _, chunk, dsts, fns) in enumerate(fills):
      # A scalar where() would be an implicit broadcast, which Mosaic GPU's warpgroup lowering
      # does not implement: pick the write instead.
      def fill(q=q, dsts=dsts, fns=fns):
        a, b_ = halo[q, 0].astype(f32), halo[q, 1].astype(f32)
        put(dsts, [fn(a, b_) for fn in fns])
      jax.lax.cond((chunk >= 0) & (chunk <= geo.last), fill,
                   lambda dsts=dsts: put(dsts, [jnp.zeros((c, w), f32)] * len(dsts)))
    return None if skip_gmem is None else [skip_buf[i] for i in range(len(tiles))]
  skips = pl.run_scoped(run, plgpu.SMEM((len(tiles), c, w), f32),
                        smem((max(len(fills), 1), 2, c, w)))
  # The input pipeline's first TMA loads reuse this scoped memory: without a proxy fence and a
  # barrier after the skip rows' loads (generic proxy), a lagging warp could read its rows after
  # a TMA load (async proxy) overwrote them, and keep the wrong values for the whole program.
  # Measured on the H200 before this fence: the MR forward at L = 131072 had 1.5K-20K wrong
  # outputs per call (the first segment, whose pipeline loads hit L2 from its halo copies), none
  # after (RESULTS, "FIR defaults at 16K-128K, and a race in the prologue"); interpret mode
  # does not model it.
  plgpu.commit_smem()
  return skips


def put(refs, vals):
  for ref, val in zip(refs, vals):
    ref[...] = val.astype(ref.dtype)


def slide(wins, geo):
  """Sliding windows only: drop each window's oldest chunk (slot m <- slot m + 1)."""
  if geo.ring:
    return
  for win in wins:
    for m in range(geo.bands):
      win[m] = win[m + 1]
  plgpu.commit_smem()


def stream_specs(geo: Geometry, tiles, block_row):
  """BlockSpecs of one streamed array (chunk ``block_row(k)`` at pipeline step k): one wide
  [c, tiles * w] box, or one swizzled [c, w] box per tile."""
  c, w = geo.chunk, geo.width
  if geo.wide:
    p = tiles[0][0] // geo.tiles
    return [plgpu.BlockSpec((c, geo.tiles * w), lambda k: (block_row(k), p))]
  return [plgpu.BlockSpec((c, w), lambda k, t=t: (block_row(k), t), transforms=swizzled(w))
          for t, _, _ in tiles]


def tile_refs(geo: Geometry, refs):
  """The per-tile [c, w] views of one streamed array's pipeline refs (``stream_specs``)."""
  if geo.wide:
    return [refs[0].at[:, pl.ds(i * geo.width, geo.width)] for i in range(geo.tiles)]
  return list(refs)


def split_streams(geo: Geometry, refs, count: int):
  """A pipeline step's refs of ``count`` streamed arrays -> per array, its per-tile views."""
  per = 1 if geo.wide else geo.tiles
  return [tile_refs(geo, refs[q * per:(q + 1) * per]) for q in range(count)]


def stage_buffer(geo: Geometry, n_out: int):
  """Staged outputs: [slots, n_out, c, tiles * w] unswizzled (wide) or [slots, n_out, tiles, c,
  w] swizzled."""
  c, w, t = geo.chunk, geo.width, geo.tiles
  if geo.wide:
    return plgpu.SMEM((geo.store_slots, n_out, c, t * w), jnp.bfloat16)
  return smem((geo.store_slots, n_out, t, c, w))


def store(outs, stage, gmems, b, rows, tiles, k, geo: Geometry):
  """Registers -> staged shared memory -> HBM, by hand (emit_pipeline's out_specs do not run in
  interpret mode: gap 2 in ``fir_conv_mgpu.py``): output o's per-tile values ``outs[o]`` go to
  slot ``k mod store_slots`` of ``stage`` (``stage_buffer``) once the copies out of that slot
  (issued ``store_slots`` steps ago) have read it, one fence, then the TMA copies to rows
  ``rows`` of ``gmems[o]`` (one per output if wide, else one per tile)."""
  slots, w = geo.store_slots, geo.width
  copies = len(outs) * (1 if geo.wide else geo.tiles)
  plgpu.wait_smem_to_gmem((slots - 1) * copies, wait_read_only=True)
  at = stage.at[jax.lax.rem(k, slots) if slots > 1 else 0]
  for o, vals in enumerate(outs):
    put([at.at[o, :, pl.ds(i * w, w)] if geo.wide else at.at[o, i] for i in range(len(vals))],
        vals)
  plgpu.commit_smem()
  for o, gmem in enumerate(gmems):
    if geo.wide:
      plgpu.copy_smem_to_gmem(at.at[o], gmem.at[b, rows, pl.ds(tiles[0][0] * w, geo.tiles * w)])
    else:
      for i, (_, _, cols) in enumerate(tiles):
        plgpu.copy_smem_to_gmem(at.at[o, i], gmem.at[b, rows, cols])


def launch(body, geo: Geometry, out_type, scratch, interpret: bool, name: str):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(geo.batch, geo.n_progs, geo.n_segs), grid_names=("batch", "tile", "seg"),
      compiler_params=plgpu.CompilerParams(), kernel_name=name,
      interpret=plgpu.InterpretGPUParams() if interpret else None)
