"""Gated grouped FIR convolution, forward and backward, as Mosaic GPU (Hopper) Pallas kernels.

    y = x2 * (h * u + dskip * u),   u = x1 * v,   causal, per channel

The same operator as ``fir_conv.py`` (the Triton-lowered kernels, whose reference this family
shares), on the maintained Pallas GPU backend: TMA copies into shared memory, ``wgmma`` on the
tensor cores (bf16 in, float32 accumulate), ``plgpu.emit_pipeline`` streaming the sequence.
x1, v, x2: [B, L, D] bfloat16; h: [G, K] grouped filters, true-convolution orientation
(``h[:, 0]`` multiplies the current token; filter g serves channels g*D/G … (g+1)*D/G - 1);
dskip: [D] or None.

Algorithm (docs/architecture.md, "The two-stage blocked convolution"): cut L into chunks of c
tokens (c = 64, one warpgroup's wgmma M). The causal Toeplitz operator is block-banded with
n + 1 bands, n = ceil((K - 1) / c) (1 for SE, 2 for K = 128): ``Y_j = sum_m H_m U_{j-m}``,
``H_m[i, i'] = h[i + m c - i']`` (zero outside 0..K-1). All bands are one wgmma of depth (n+1)c:
``Y_j = [H_n | … | H_1 | H_0] @ [U_{j-n}; …; U_j]`` — the [c, (n+1)c] band row of the program's
group is the A operand (built once by XLA, a few KiB per group, TMA-copied into shared memory
once per program), the window of the last n+1 chunks of u the B operand: a shared-memory
buffer that slides by one chunk per step (the halo of K-1 past tokens, as the Triton kernel
carries ``u_prev``; a program's first chunk loads the n chunks before it once). A program owns
``w`` channels of one group (the wgmma N) and ``seg_chunks`` consecutive chunks of one batch
row; the gates are fused so u and h*u never touch HBM.

Backward (dz = dy * x2): ``dx2 = dy * z`` (z recomputed: one wgmma), ``du = [H_0^T | … | H_n^T]
@ [dz_j; …; dz_{j+n}] + dskip * dz`` (one wgmma on a window of dz that slides ahead: each step
reads x2, dy of chunk j+n, and keeps dz in bf16 for the wgmmas and in float32 for the skip term
and ddskip, and dy for dx2; dx1 = du * v, dv = du * x1), and for dh one more wgmma per chunk
accumulating ``P = dz_j @ [U_{j-n}; …; U_j]^T`` ([c, (n+1)c] float32, in accumulator registers
across the program's chunks): the token lag of entry (i, r) is n c + i - r, so ``dh[g, k] =
sum_i P[i, n c + i - k]`` over the programs of group g. Each program writes its P and its [c, w]
float32 partial of sum dz * u (ddskip); ``_reduce_dh`` sums them (no atomics), as
``fir_conv_bwd.reduce_dh`` does for the Triton kernel. Like the Triton backward (which carries
the same chunks in registers) it reads each of x1, v, x2, dy once and writes dx1, dv, dx2 once,
plus the n chunks of halo per program.

Limits (errors, never silent fallbacks): bfloat16 only (a float32 wgmma is tf32); the group
size D/G must be a multiple of 16 (the wgmma N, and the K of the dh wgmma) — Evo 2 1B's 15
channels per group needs the Triton kernel's aligned layout, not written here; K <= 129.

Interpret mode (``interpret=True``: ``plgpu.InterpretGPUParams``, CPU tests) in JAX 0.11.2 has
gaps this file works around, so that the same code runs compiled and interpreted:
  1. ``pl.program_id`` always returns 0 under a ``pallas_call`` grid (jaxpr_interpret.py:
     "zero is the only valid program id"), and ``pallas_call`` BlockSpecs with index maps fail
     ``assert all(bm.has_trivial_window() ...)``: so the kernels are ``plgpu.kernel`` meshes
     (``lax.axis_index`` of named grid axes) over GMEM refs. Reproducer::
       def k(o, s):
         s[...] = jnp.full((8, 16), pl.program_id(0), jnp.float32); plgpu.commit_smem()
         plgpu.copy_smem_to_gmem(s, o.at[pl.ds(pl.program_id(0) * 8, 8)])
         plgpu.wait_smem_to_gmem(0)
       pl.pallas_call(k, grid=(3,), out_specs=plgpu.BlockSpec(memory_space=plgpu.GMEM),
                      out_shape=jax.ShapeDtypeStruct((24, 16), jnp.float32),
                      scratch_shapes=[plgpu.SMEM((8, 16), jnp.float32)],
                      interpret=plgpu.InterpretGPUParams())()   # rows 8.. stay NaN
  2. ``emit_pipeline`` out_specs issue predicated SMEM->GMEM copies: ``NotImplementedError:
     predicate not supported`` (gpu_callbacks.copy_smem_to_gmem). Outputs are therefore staged
     in shared memory and copied out by hand (``copy_smem_to_gmem`` + ``wait_smem_to_gmem``).
  3. ``plgpu.Barrier`` in a kernel's scratch shapes: ``NotImplementedError: nan + barrier``
     (the interpreter tries to NaN-fill it); barriers are allocated with ``pl.run_scoped``.
  4. ``pl.run_state`` around ``plgpu.wgmma`` discharges to the value-level ``wgmma`` primitive,
     which has no interpret rule (``MLIR translation rule for primitive 'wgmma' not found for
     platform cpu``); accumulators are ``pl.run_scoped(..., plgpu.ACC(...))`` refs instead.
Interpret mode NaN-fills every fresh buffer, outputs included, so an element the kernel fails to
write shows up as NaN in the tests without aliasing poisoned inputs. It does not model register
layouts, wgmma operand rules, shared-memory capacity, register pressure or bank conflicts. The
first two are checked on CPU too: ``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``
runs the Mosaic GPU lowering and layout inference without a GPU (tests/kernels), and caught two
things interpret mode accepts: a scalar ``jnp.where`` over a [c, w] array ("Implicit broadcast
not implemented with warpgroup semantics"; the window fills pick the write with ``lax.cond``)
and wgmma operands with different swizzles (layout inference fails; every operand here uses the
channel tile's swizzle). Only the PTX compile, shared-memory capacity and registers need the
GPU. ``smem_bytes`` estimates a launch's shared memory; launches over ``SMEM_LIMIT`` are refused.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sh2_jax.kernels._pallas import check_gated_inputs

__all__ = ["MgpuBlockSizes", "default_block_sizes", "gated_fir_conv_mgpu", "mgpu_misfit",
           "smem_bytes"]

SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on Hopper
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
class _Geometry:
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


def _geometry(x_shape, h_shape, bs: MgpuBlockSizes) -> _Geometry:
  b, length, d = x_shape
  groups, taps = h_shape
  chunks = -(-length // bs.chunk)
  n_segs = -(-chunks // bs.seg_chunks)
  seg = -(-chunks // n_segs)  # balanced: padding below one chunk per segment
  return _Geometry(b, length, d, groups, taps, bs.chunk, bs.width, seg, n_segs, bs.stages)


def _band_rows(h, c: int, n: int):
  """[G, K] -> forward [H_n | … | H_0] and backward [H_0^T | … | H_n^T], each [G, c, (n+1)c]
  bfloat16, ``H_m[i, i'] = h[i + m c - i']``."""
  groups, taps = h.shape
  table = jnp.pad(h.astype(f32), ((0, 0), (c, (n + 2) * c - taps)))  # table[g, c + d] = h[g, d]
  diff = np.arange(c)[:, None] - np.arange(c)[None, :]  # i - i'
  hm = [table[:, c + m * c + diff] for m in range(n + 1)]
  fwd = jnp.concatenate(hm[::-1], axis=2)
  bwd = jnp.concatenate([a.transpose(0, 2, 1) for a in hm], axis=2)
  return fwd.astype(jnp.bfloat16), bwd.astype(jnp.bfloat16)


def _swizzled(minor: int, dtype=jnp.bfloat16):
  """Shared-memory tiling + swizzle for a wgmma operand whose last dimension is ``minor``."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _smem(shape, minor=None, dtype=jnp.bfloat16):
  """A bf16 shared-memory buffer swizzled for a last dimension of ``minor`` (default its own):
  the operands of one wgmma must share one swizzle, so the band rows take the channel tile's."""
  return plgpu.SMEM(shape, dtype, transforms=_swizzled(minor or shape[-1], dtype))


def _pad(a, geo: _Geometry):
  return jnp.pad(a, ((0, 0), (0, geo.padded_length - geo.length), (0, 0)))


def _skip_rows(dskip, geo: _Geometry):
  """dskip [D] -> [c, D] float32: broadcast over a chunk's rows once, in XLA, so that a [c, w]
  tile of it is read like any other operand."""
  skip = jnp.zeros((geo.channels,), f32) if dskip is None else dskip.astype(f32)
  return jnp.broadcast_to(skip[None, :], (geo.chunk, geo.channels))


def _matmul(a_ref, b_ref, shape):
  """``a @ b`` by one wgmma into a fresh float32 accumulator, read back to registers."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, f32))


def _program(geo: _Geometry):
  """(batch row, channel tile, first chunk, group, column slice) of this program."""
  b, t, s = (jax.lax.axis_index(n) for n in ("batch", "tile", "seg"))
  return b, t, s * geo.seg_chunks, t // geo.tiles_per_group, pl.ds(t * geo.width, geo.width)


def _fetch(copies, bars):
  """TMA copies (src GMEM ref, dst SMEM ref), one barrier each, then wait for all."""
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[i])


def _product(a, b):
  return a * b


def _fill_window(geo, wins, chunks, a_gmem, b_gmem, b, cols, halo, fns=None):
  """Rows ``m c`` of each window in ``wins`` <- ``fn(a, b)`` (float32; default ``a * b``) of
  chunk ``chunks[m]``, zero for a chunk outside 0..last: the halo of past u (forward) or of
  future dz and dy (backward)."""
  fns = fns or [_product] * len(wins)
  c = geo.chunk
  for m, chunk in enumerate(chunks):
    rows = pl.ds(jnp.clip(chunk, 0, geo.last) * c, c)
    pl.run_scoped(functools.partial(_fetch, [(a_gmem.at[b, rows, cols], halo.at[0]),
                                             (b_gmem.at[b, rows, cols], halo.at[1])]),
                  plgpu.Barrier(num_barriers=2))
    # A scalar where() would be an implicit broadcast, which Mosaic GPU's warpgroup lowering
    # does not implement: pick the write instead.
    live = (chunk >= 0) & (chunk <= geo.last)
    dsts = [win.at[pl.ds(m * c, c)] for win in wins]

    def fill():
      a, b_ = halo[0].astype(f32), halo[1].astype(f32)
      _put(dsts, [fn(a, b_) for fn in fns])
    jax.lax.cond(live, fill, lambda: _put(dsts, [jnp.zeros((c, geo.width), f32)] * len(dsts)))


def _put(refs, vals):
  for ref, val in zip(refs, vals):
    ref[...] = val.astype(ref.dtype)


def _slide(win, geo):
  """Drop the window's oldest chunk: rows [0, n c) <- rows [c, (n + 1) c)."""
  c, n = geo.chunk, geo.bands
  win[pl.ds(0, n * c), :] = win[pl.ds(c, n * c), :]


def _store(val, stage_ref, dst_gmem):
  """Registers -> staged shared memory -> HBM (by hand: see gap 2 in the module docstring)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous copy out of stage_ref
  stage_ref[...] = val.astype(stage_ref.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(stage_ref, dst_gmem)


def _launch(body, geo: _Geometry, out_type, scratch, interpret: bool, name: str):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(geo.batch, geo.n_tiles, geo.n_segs), grid_names=("batch", "tile", "seg"),
      compiler_params=plgpu.CompilerParams(), kernel_name=name,
      interpret=plgpu.InterpretGPUParams() if interpret else None)


# ----------------------------------------------------------------------------- forward kernel


def _fwd_body(geo: _Geometry, has_skip: bool):
  c, w, n = geo.chunk, geo.width, geo.bands

  def kernel(band_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, y_gmem,
             band_smem, skip_smem, halo, u_win, y_stage):
    b, t, first, g, cols = _program(geo)
    pl.run_scoped(functools.partial(_fetch, [(band_gmem.at[g], band_smem),
                                             (skip_gmem.at[:, cols], skip_smem)]),
                  plgpu.Barrier(num_barriers=2))
    _fill_window(geo, [u_win], [first - n + m for m in range(n)], x1_gmem, v_gmem, b, cols,
                 halo)

    def step(idx, x1_ref, v_ref, x2_ref):
      (k,) = idx
      u = x1_ref[...] * v_ref[...]
      u_win[pl.ds(n * c, c), :] = u
      plgpu.commit_smem()
      z = _matmul(band_smem, u_win, (c, w))
      if has_skip:
        z = z + skip_smem[...] * u.astype(f32)
      rows = pl.ds((first + k) * c, c)
      _store(x2_ref[...].astype(f32) * z, y_stage, y_gmem.at[b, rows, cols])
      _slide(u_win, geo)
      plgpu.commit_smem()

    spec = plgpu.BlockSpec((c, w), lambda k: (first + k, t), transforms=_swizzled(w))
    plgpu.emit_pipeline(step, grid=(geo.seg_chunks,), in_specs=[spec] * 3,
                        max_concurrent_steps=geo.stages)(x1_gmem.at[b], v_gmem.at[b],
                                                         x2_gmem.at[b])
    plgpu.wait_smem_to_gmem(0)

  return kernel


def fwd(x1, v, x2, h, dskip, bs: MgpuBlockSizes, interpret: bool = False):
  """The forward launch: y [B, L, D] bfloat16."""
  geo = _geometry(x1.shape, h.shape, bs)
  c, w, n = geo.chunk, geo.width, geo.bands
  band_f, _ = _band_rows(h, c, n)
  xs = [_pad(a, geo) for a in (x1, v, x2)]
  scratch = (_smem((c, (n + 1) * c), w), plgpu.SMEM((c, w), f32), _smem((2, c, w)),
             _smem(((n + 1) * c, w)), _smem((c, w)))
  y = _launch(_fwd_body(geo, dskip is not None), geo,
              jax.ShapeDtypeStruct(xs[0].shape, x1.dtype), scratch, interpret,
              "gated_fir_fwd_mgpu")(band_f, _skip_rows(dskip, geo), *xs)
  return y[:, :geo.length]


# ----------------------------------------------------------------------------- backward kernel


def _bwd_body(geo: _Geometry, has_skip: bool):
  c, w, n = geo.chunk, geo.width, geo.bands

  def kernel(band_f_gmem, band_b_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, dy_gmem,
             dx1_gmem, dv_gmem, dx2_gmem, p_gmem, s_gmem,
             bf_smem, bb_smem, skip_smem, halo, u_win, dz_win, dzf_win, dy_win, stage, s_acc,
             p_stage):
    b, t, first, g, cols = _program(geo)
    s_idx = jax.lax.axis_index("seg")
    pl.run_scoped(functools.partial(_fetch, [(band_f_gmem.at[g], bf_smem),
                                             (band_b_gmem.at[g], bb_smem),
                                             (skip_gmem.at[:, cols], skip_smem)]),
                  plgpu.Barrier(num_barriers=3))
    _fill_window(geo, [u_win], [first - n + m for m in range(n)], x1_gmem, v_gmem, b, cols,
                 halo)
    # dz twice: bf16 for the wgmmas, float32 for the skip term and ddskip (as the Triton
    # kernel); dy for dx2 = dy * z
    _fill_window(geo, [dz_win, dzf_win, dy_win], [first + m for m in range(n)], dy_gmem,
                 x2_gmem, b, cols, halo, [_product, _product, lambda dy, x2: dy])
    s_acc[...] = jnp.zeros((c, w), f32)

    def run(p_acc):
      def step(idx, x1_ref, v_ref, x2n_ref, dyn_ref):
        (k,) = idx
        j = first + k
        x1, v = x1_ref[...], v_ref[...]
        u = x1 * v
        dy_n = dyn_ref[...].astype(f32)  # chunk j + n
        dz_n = dy_n * x2n_ref[...].astype(f32)
        u_win[pl.ds(n * c, c), :] = u
        dsts = [win.at[pl.ds(n * c, c)] for win in (dz_win, dzf_win, dy_win)]
        jax.lax.cond(j + n <= geo.last, lambda: _put(dsts, [dz_n, dz_n, dy_n]),
                     lambda: _put(dsts, [jnp.zeros((c, w), f32)] * 3))
        plgpu.commit_smem()
        z = _matmul(bf_smem, u_win, (c, w))
        du = _matmul(bb_smem, dz_win, (c, w))
        # dh partial: P += dz_j @ [U_{j-n}; …; U_j]^T, over this program's chunks.
        plgpu.wgmma(p_acc, dz_win.at[pl.ds(0, c)], u_win.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        u_f = u.astype(f32)
        dz_f = dzf_win[pl.ds(0, c), :]
        if has_skip:
          skip = skip_smem[...]
          z = z + skip * u_f
          du = du + skip * dz_f
        s_acc[...] += dz_f * u_f
        rows = pl.ds(j * c, c)
        _store(dy_win[pl.ds(0, c), :].astype(f32) * z, stage.at[0],
               dx2_gmem.at[b, rows, cols])
        _store(du * v.astype(f32), stage.at[1], dx1_gmem.at[b, rows, cols])
        _store(du * x1.astype(f32), stage.at[2], dv_gmem.at[b, rows, cols])
        _slide(u_win, geo)
        _slide(dz_win, geo)
        _slide(dzf_win, geo)
        _slide(dy_win, geo)
        plgpu.commit_smem()

      cur = plgpu.BlockSpec((c, w), lambda k: (first + k, t), transforms=_swizzled(w))
      ahead = plgpu.BlockSpec((c, w), lambda k: (jnp.minimum(first + k + n, geo.last), t),
                              transforms=_swizzled(w))
      plgpu.emit_pipeline(step, grid=(geo.seg_chunks,), in_specs=[cur] * 2 + [ahead] * 2,
                          max_concurrent_steps=geo.stages)(
                              x1_gmem.at[b], v_gmem.at[b], x2_gmem.at[b], dy_gmem.at[b])
      return p_acc[...]

    p = pl.run_scoped(run, plgpu.ACC((c, (n + 1) * c), f32))
    plgpu.wait_smem_to_gmem(0)
    p_stage[...] = p
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(p_stage, p_gmem.at[b, t, s_idx])
    plgpu.copy_smem_to_gmem(s_acc, s_gmem.at[b, t, s_idx])
    plgpu.wait_smem_to_gmem(0)

  return kernel


def _reduce_dh(p, geo: _Geometry):
  """The reduction pass: partials [B, tiles, segs, c, (n+1)c] -> dh [G, K] float32
  (``dh[g, k] = sum_i P[i, n c + i - k]`` over the tiles of group g)."""
  c, n = geo.chunk, geo.bands
  m = p.sum(axis=(0, 2))  # [tiles, c, (n+1)c]
  lag_col = n * c + np.arange(c)[:, None] - np.arange(geo.taps)[None, :]  # [i, k] -> column
  diag = jnp.take_along_axis(m, jnp.asarray(lag_col)[None], axis=2).sum(axis=1)  # [tiles, K]
  return diag.reshape(geo.groups, geo.tiles_per_group, geo.taps).sum(axis=1)


def bwd(x1, v, x2, h, dskip, dy, bs: MgpuBlockSizes, interpret: bool = False):
  """Gradients (dx1, dv, dx2, dh [G, K] float32, ddskip [D] float32) of ``fwd``."""
  geo = _geometry(x1.shape, h.shape, bs)
  c, w, n = geo.chunk, geo.width, geo.bands
  band_f, band_b = _band_rows(h, c, n)
  xs = [_pad(a, geo) for a in (x1, v, x2, dy.astype(x1.dtype))]
  parts = (geo.batch, geo.n_tiles, geo.n_segs)
  out_type = tuple(jax.ShapeDtypeStruct(xs[0].shape, x1.dtype) for _ in range(3)) + (
      jax.ShapeDtypeStruct(parts + (c, (n + 1) * c), f32),
      jax.ShapeDtypeStruct(parts + (c, w), f32))
  scratch = (_smem((c, (n + 1) * c), w), _smem((c, (n + 1) * c), w), plgpu.SMEM((c, w), f32),
             _smem((2, c, w)), _smem(((n + 1) * c, w)), _smem(((n + 1) * c, w)),
             plgpu.SMEM(((n + 1) * c, w), f32), _smem(((n + 1) * c, w)), _smem((3, c, w)), plgpu.SMEM((c, w), f32), plgpu.SMEM((c, (n + 1) * c), f32))
  dx1, dv, dx2, p, s = _launch(_bwd_body(geo, dskip is not None), geo, out_type, scratch,
                               interpret, "gated_fir_bwd_mgpu")(
                                   band_f, band_b, _skip_rows(dskip, geo), *xs)
  crop = lambda a: a[:, :geo.length]
  dd = s.sum(axis=(0, 2, 3)).reshape(geo.channels)
  return crop(dx1), crop(dv), crop(dx2), _reduce_dh(p, geo), dd


# ----------------------------------------------------------------------------- public op


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gated_fir(x1, v, x2, h, dskip, opts):
  bs, has_skip, interpret = opts
  return fwd(x1, v, x2, h, dskip if has_skip else None, bs, interpret)


def _gated_fir_fwd(x1, v, x2, h, dskip, opts):
  return _gated_fir(x1, v, x2, h, dskip, opts), (x1, v, x2, h, dskip)


def _gated_fir_bwd(opts, res, dy):
  bs, has_skip, interpret = opts
  x1, v, x2, h, dskip = res
  reason = mgpu_misfit(x1.shape, h.shape, x1.dtype, bs)
  if reason is not None:
    raise ValueError(f"gated_fir_conv_mgpu cannot differentiate this layer: {reason}")
  dx1, dv, dx2, dh, dd = bwd(x1, v, x2, h, dskip if has_skip else None, dy, bs, interpret)
  return dx1, dv, dx2, dh.astype(h.dtype), dd.astype(dskip.dtype)


_gated_fir.defvjp(_gated_fir_fwd, _gated_fir_bwd)


def gated_fir_conv_mgpu(x1: jax.Array, v: jax.Array, x2: jax.Array, h: jax.Array,
                        dskip: jax.Array | None = None, *, interpret: bool = False,
                        block_sizes: MgpuBlockSizes | None = None) -> jax.Array:
  """``x2 * (h * (x1 * v) + dskip * (x1 * v))``, causal, by the Mosaic GPU kernels.

  x1, v, x2: [B, L, D] bfloat16; h: [G, K] (true convolution; D/G a multiple of 16, K <= 129);
  dskip: [D] or None. Returns [B, L, D] bfloat16; differentiable in all arrays. ``interpret``
  runs the kernels in Mosaic GPU interpret mode on CPU (slow, tests only). Block sizes default
  to ``default_block_sizes``; a geometry they cannot run is a ValueError naming why.
  """
  check_gated_inputs(x1, v, x2)
  if h.ndim != 2:
    raise ValueError(f"h must be [G, K]; got shape {h.shape}")
  if dskip is not None and dskip.shape != (x1.shape[2],):
    raise ValueError(f"dskip must be [D]=[{x1.shape[2]}]; got shape {dskip.shape}")
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"gated_fir_conv_mgpu runs Mosaic GPU kernels on a GPU, but JAX runs on "
                     f"{jax.default_backend()!r}; pass interpret=True (slow, for tests) or use "
                     f"sh2_jax.ops.fir.gated_conv")
  bs = block_sizes or default_block_sizes(x1.shape[2] // max(h.shape[0], 1), h.shape[1])
  reason = mgpu_misfit(x1.shape, h.shape, x1.dtype, bs, backward=False)
  if reason is not None:
    raise ValueError(f"gated_fir_conv_mgpu cannot run this layer: {reason}")
  has_skip = dskip is not None
  if dskip is None:
    dskip = jnp.zeros((x1.shape[2],), f32)
  return _gated_fir(x1, v, x2, h, dskip, (bs, has_skip, interpret))
