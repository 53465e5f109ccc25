"""The tiling and shared building blocks of the Mosaic GPU gated FIR kernels
(``fir_conv_mgpu.py`` forward and public op, ``fir_conv_mgpu_bwd.py`` backward; the algorithm and
the interpret-mode notes are in ``fir_conv_mgpu.py``): block sizes, the launch geometry and what
it cannot run, the shared-memory estimate, the Toeplitz band rows, and the in-kernel pieces both
directions use (TMA fetches, sliding windows, staged stores, the launch).
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
  """chunk: tokens per chunk c (64 or 128; the wgmma M); width: channels per program w (16, 32,
  64 or 128; divides the group size; the wgmma N); seg_chunks: chunks per program (upper bound);
  stages: pipeline depth (``max_concurrent_steps``)."""
  chunk: int = 64
  width: int = 16
  seg_chunks: int = 32
  stages: int = 2


def bands(taps: int, chunk: int) -> int:
  """n: the past chunks one output chunk reads (at least 1)."""
  return max(1, -(-(taps - 1) // chunk))


def smem_bytes(bs: MgpuBlockSizes, taps: int, backward: bool = False) -> int:
  """Shared memory of one program (bf16 operands, float32 partials), as allocated below."""
  c, w, s = bs.chunk, bs.width, bs.stages
  n1 = bands(taps, c) + 1
  tile = c * w * 2
  band_row = c * n1 * c * 2
  if not backward:  # band row, pipelined x1 v x2, halo x1 v, u window, staged y
    return band_row + s * 3 * tile + 2 * tile + n1 * tile + tile
  # two band rows, dskip rows (f32), pipelined x1 v x2' dy', halo (2), windows of u, dz (bf16
  # and f32) and dy, staged dx1 dv dx2, the ddskip partial (f32), the staged dh partial (f32)
  return (2 * band_row + 2 * tile + s * 4 * tile + 2 * tile + 5 * n1 * tile + 3 * tile
          + 2 * tile + c * n1 * c * 4)


def default_block_sizes(group_size: int, taps: int) -> MgpuBlockSizes:
  """Untuned (no Hopper measurement yet): chunk 64, the widest channel tile that divides the
  group and fits the backward's shared memory."""
  for w in (64, 32, 16):
    bs = MgpuBlockSizes(chunk=64, width=w)
    if group_size % w == 0 and smem_bytes(bs, taps, backward=True) <= SMEM_LIMIT:
      return bs
  return MgpuBlockSizes(chunk=64, width=16)


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

  @property
  def bands(self):
    return bands(self.taps, self.chunk)

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
  def tiles_per_group(self):
    return (self.channels // self.groups) // self.width


def mgpu_misfit(x_shape, h_shape, dtype, bs: MgpuBlockSizes | None = None,
                backward: bool = True) -> str | None:
  """Why these kernels (the forward, and with ``backward`` its gradient too) cannot run this
  geometry, or None when they can."""
  _, _, d = x_shape
  groups, taps = h_shape
  if jnp.dtype(dtype) != jnp.bfloat16:
    return f"the Mosaic GPU FIR kernels take bfloat16 inputs, not {jnp.dtype(dtype).name}"
  if groups < 1 or d % groups:
    return f"filter groups {groups} do not divide channels {d}"
  gs = d // groups
  bs = bs or default_block_sizes(gs, taps)
  if bs.chunk not in (64, 128):
    return f"chunk {bs.chunk} is not 64 or 128"
  if bands(taps, bs.chunk) > MAX_BANDS:
    return (f"filter length {taps} exceeds {MAX_BANDS * bs.chunk + 1} taps (chunk {bs.chunk}, "
            f"at most {MAX_BANDS} past chunks)")
  if bs.width not in (16, 32, 64, 128) or gs % bs.width:
    return (f"group size {gs} (channels {d} / groups {groups}) is not a multiple of the "
            f"channel tile {bs.width}; the Mosaic GPU kernels need a multiple of 16")
  for bwd in (False, True) if backward else (False,):
    if smem_bytes(bs, taps, bwd) > SMEM_LIMIT:
      return (f"block sizes {bs} need {smem_bytes(bs, taps, bwd)} bytes of shared memory "
              f"({'backward' if bwd else 'forward'}) for {taps} taps, over {SMEM_LIMIT}")
  return None


def geometry(x_shape, h_shape, bs: MgpuBlockSizes) -> Geometry:
  b, length, d = x_shape
  groups, taps = h_shape
  chunks = -(-length // bs.chunk)
  n_segs = -(-chunks // bs.seg_chunks)
  seg = -(-chunks // n_segs)  # balanced: padding below one chunk per segment
  return Geometry(b, length, d, groups, taps, bs.chunk, bs.width, seg, n_segs, bs.stages)


def band_rows(h, c: int, n: int):
  """[G, K] -> forward [H_n | … | H_0] and backward [H_0^T | … | H_n^T], each [G, c, (n+1)c]
  bfloat16, ``H_m[i, i'] = h[i + m c - i']``."""
  groups, taps = h.shape
  table = jnp.pad(h.astype(f32), ((0, 0), (c, (n + 2) * c - taps)))  # table[g, c + d] = h[g, d]
  diff = np.arange(c)[:, None] - np.arange(c)[None, :]  # i - i'
  hm = [table[:, c + m * c + diff] for m in range(n + 1)]
  fwd = jnp.concatenate(hm[::-1], axis=2)
  bwd = jnp.concatenate([a.transpose(0, 2, 1) for a in hm], axis=2)
  return fwd.astype(jnp.bfloat16), bwd.astype(jnp.bfloat16)


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


def matmul(a_ref, b_ref, shape):
  """``a @ b`` by one wgmma into a fresh float32 accumulator, read back to registers."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, f32))


def program(geo: Geometry):
  """(batch row, channel tile, first chunk, group, column slice) of this program."""
  b, t, s = (jax.lax.axis_index(n) for n in ("batch", "tile", "seg"))
  return b, t, s * geo.seg_chunks, t // geo.tiles_per_group, pl.ds(t * geo.width, geo.width)


def fetch(copies, bars):
  """TMA copies (src GMEM ref, dst SMEM ref), one barrier each, then wait for all."""
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[i])


def product(a, b):
  return a * b


def fill_window(geo, wins, chunks, a_gmem, b_gmem, b, cols, halo, fns=None):
  """Rows ``m c`` of each window in ``wins`` <- ``fn(a, b)`` (float32; default ``a * b``) of
  chunk ``chunks[m]``, zero for a chunk outside 0..last: the halo of past u (forward) or of
  future dz and dy (backward)."""
  fns = fns or [product] * len(wins)
  c = geo.chunk
  for m, chunk in enumerate(chunks):
    rows = pl.ds(jnp.clip(chunk, 0, geo.last) * c, c)
    pl.run_scoped(functools.partial(fetch, [(a_gmem.at[b, rows, cols], halo.at[0]),
                                            (b_gmem.at[b, rows, cols], halo.at[1])]),
                  plgpu.Barrier(num_barriers=2))
    # A scalar where() would be an implicit broadcast, which Mosaic GPU's warpgroup lowering
    # does not implement: pick the write instead.
    live = (chunk >= 0) & (chunk <= geo.last)
    dsts = [win.at[pl.ds(m * c, c)] for win in wins]

    def fill():
      a, b_ = halo[0].astype(f32), halo[1].astype(f32)
      put(dsts, [fn(a, b_) for fn in fns])
    jax.lax.cond(live, fill, lambda: put(dsts, [jnp.zeros((c, geo.width), f32)] * len(dsts)))


def put(refs, vals):
  for ref, val in zip(refs, vals):
    ref[...] = val.astype(ref.dtype)


def slide(win, geo):
  """Drop the window's oldest chunk: rows [0, n c) <- rows [c, (n + 1) c)."""
  c, n = geo.chunk, geo.bands
  win[pl.ds(0, n * c), :] = win[pl.ds(c, n * c), :]


def store(val, stage_ref, dst_gmem):
  """Registers -> staged shared memory -> HBM, by hand: emit_pipeline's out_specs do not run in
  interpret mode (gap 2 in ``fir_conv_mgpu.py``)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous copy out of stage_ref
  stage_ref[...] = val.astype(stage_ref.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(stage_ref, dst_gmem)


def launch(body, geo: Geometry, out_type, scratch, interpret: bool, name: str):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(geo.batch, geo.n_tiles, geo.n_segs), grid_names=("batch", "tile", "seg"),
      compiler_params=plgpu.CompilerParams(), kernel_name=name,
      interpret=plgpu.InterpretGPUParams() if interpret else None)
