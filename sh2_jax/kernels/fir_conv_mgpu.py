"""Gated grouped FIR convolution, forward and backward, as Mosaic GPU (Hopper) Pallas kernels.

    y = x2 * (h * u + dskip * u),   u = x1 * v,   causal, per channel

The same operator as ``fir_conv.py`` (the Triton-lowered kernels, whose reference this family
shares), on the maintained Pallas GPU backend: TMA copies into shared memory, ``wgmma`` on the
tensor cores (bf16 in, float32 accumulate), ``plgpu.emit_pipeline`` streaming the sequence.
x1, v, x2: [B, L, D] bfloat16; h: [G, K] grouped filters, true-convolution orientation
(``h[:, 0]`` multiplies the current token; filter g serves channels g*D/G … (g+1)*D/G - 1);
dskip: [D] or None.

Algorithm (docs/architecture.md, "The two-stage blocked convolution"): cut L into chunks of c
tokens (c >= K). The causal Toeplitz operator is block-bidiagonal, ``Y_j = H0 U_j + H1 U_{j-1}``
with ``H0[i, i'] = h[i - i']`` and ``H1[i, i'] = h[i + c - i']``. Here both blocks are one wgmma
of depth 2c: ``Y_j = [H1 | H0] @ [U_{j-1}; U_j]`` — the [c, 2c] block pair of the program's group
is the A operand (built once per group by XLA, a few KiB, TMA-copied into shared memory once per
program), ``[U_{j-1}; U_j]`` the B operand: a [2c, w] shared-memory buffer whose upper half
carries u of the previous chunk (the halo of K-1 past tokens, as the Triton kernel carries
``u_prev``; a program's first chunk loads chunk first-1 once). A program owns ``w`` channels of
one group (the wgmma N) and ``seg_chunks`` consecutive chunks of one batch row; the gates are
fused so u and h*u never touch HBM.

Backward (dz = dy * x2): ``dx2 = dy * z`` (z recomputed: one wgmma), ``du = [H0^T | H1^T] @
[dz_j; dz_{j+1}] + dskip * dz`` (one wgmma; dx1 = du * v, dv = du * x1), and for dh one more
wgmma per chunk accumulating ``P = dz_j @ [U_{j-1}; U_j]^T`` ([c, 2c] float32, in the
accumulator registers across the program's chunks): token lag of entry (i, r) is c + i - r, so
``dh[g, k] = sum_i P[i, c + i - k]`` over the programs of group g — each program writes its P
(and its [c, w] float32 partial of sum dz * u for ddskip), and ``_reduce_dh`` sums them (no
atomics), as ``fir_conv_bwd.reduce_dh`` does for the Triton kernel.

Limits (errors, never silent fallbacks): bfloat16 only (a float32 wgmma is tf32); the group
size D/G must be a multiple of 16 (the wgmma N and, for dh, K granularity of bf16 — Evo 2 1B's
15 channels per group needs the Triton kernel's aligned layout, not written here); K <= 128.

Interpret mode (``interpret=True``: ``plgpu.InterpretGPUParams``, CPU tests) in JAX 0.11.2 has
three gaps this file works around, so that the same code runs compiled and interpreted:
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
Also: ``pl.run_state`` around ``plgpu.wgmma`` discharges to the value-level ``wgmma`` primitive,
which has no interpret rule (``MLIR translation rule for primitive 'wgmma' not found for
platform cpu``); accumulators are ``pl.run_scoped(..., plgpu.ACC(...))`` refs instead.
Interpret mode NaN-fills every fresh buffer, outputs included, so an element the kernel fails to
write shows up as NaN in the tests without aliasing poisoned inputs.

Shared-memory and register limits exist only on hardware; ``smem_bytes`` estimates a launch's
footprint and the public function refuses one over ``SMEM_LIMIT``.
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
from sh2_jax.kernels.fir_layout import filter_table

__all__ = ["MgpuBlockSizes", "gated_fir_conv_mgpu", "mgpu_misfit", "smem_bytes"]

SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on Hopper
MAX_TAPS = 128
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MgpuBlockSizes:
  """chunk: tokens per chunk c (64 or 128, >= K; the wgmma M); width: channels per program w
  (16, 32 or 64; divides the group size; the wgmma N); seg_chunks: chunks per program (upper
  bound); stages: pipeline depth (``max_concurrent_steps``)."""
  chunk: int = 64
  width: int = 64
  seg_chunks: int = 32
  stages: int = 2


def default_block_sizes(group_size: int, taps: int) -> MgpuBlockSizes:
  """Untuned (no Hopper measurement yet): the smallest chunk that holds the filter, the widest
  channel tile that divides the group."""
  chunk = 64 if taps <= 64 else 128
  width = next(w for w in (64, 32, 16) if group_size % w == 0) if group_size % 16 == 0 else 16
  return MgpuBlockSizes(chunk=chunk, width=width)


def smem_bytes(bs: MgpuBlockSizes, backward: bool = False) -> int:
  """Shared memory of one program (bf16 operands, float32 partials), as allocated below."""
  c, w, n = bs.chunk, bs.width, bs.stages
  tile = c * w * 2
  if not backward:  # [H1|H0], pipelined x1 v x2, halo x1 v, [U_prev; U], staged y
    return c * 2 * c * 2 + n * 3 * tile + 2 * tile + 2 * tile + tile
  # two block pairs, pipelined x1 v x2 dy x2' dy', halo, [U_prev; U], [dz; dz'], staged dx1 dv
  # dx2, the ddskip partial and the staged dh partial (float32)
  return (2 * c * 2 * c * 2 + n * 6 * tile + 2 * tile + 2 * tile + 2 * tile + 3 * tile
          + c * w * 4 + c * 2 * c * 4)


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
  def padded_length(self):
    return self.n_segs * self.seg_chunks * self.chunk

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
  if taps > MAX_TAPS or taps > bs.chunk:
    return f"filter length {taps} exceeds the chunk {bs.chunk} (at most {MAX_TAPS} taps)"
  if bs.chunk not in (64, 128):
    return f"chunk {bs.chunk} is not 64 or 128"
  if bs.width not in (16, 32, 64, 128) or gs % bs.width:
    return (f"group size {gs} (channels {d} / groups {groups}) is not a multiple of the "
            f"channel tile {bs.width}; the Mosaic GPU kernels need a multiple of 16")
  if backward and bs.chunk > 64:
    # [c, 2c] float32 of dh partials in one warpgroup's registers (256 per thread at c = 128)
    # and two [c, 2c] block pairs in shared memory do not fit: see "Not done" above.
    return (f"the Mosaic GPU backward needs filters of at most 64 taps (chunk 64), not "
            f"{taps}; the forward alone runs up to {MAX_TAPS}")
  for bwd in (False, True) if backward else (False,):
    if smem_bytes(bs, bwd) > SMEM_LIMIT:
      return (f"block sizes {bs} need {smem_bytes(bs, bwd)} bytes of shared memory "
              f"({'backward' if bwd else 'forward'}), over {SMEM_LIMIT}")
  return None


def _geometry(x_shape, h_shape, bs: MgpuBlockSizes) -> _Geometry:
  b, length, d = x_shape
  groups, taps = h_shape
  chunks = -(-length // bs.chunk)
  n_segs = -(-chunks // bs.seg_chunks)
  seg = -(-chunks // n_segs)  # balanced: padding below one chunk per segment
  return _Geometry(b, length, d, groups, taps, bs.chunk, bs.width, seg, n_segs, bs.stages)


def _toeplitz_pairs(h, c: int):
  """[G, K] -> forward [H1 | H0] and backward [H0^T | H1^T], each [G, c, 2c] bfloat16."""
  table = filter_table(h, c)  # [G, 3c]: table[g, c + d] = h[g, d] (zeros off 0..K-1)
  diff = np.arange(c)[:, None] - np.arange(c)[None, :]  # i - i'
  h0, h1 = table[:, c + diff], table[:, 2 * c + diff]
  fwd = jnp.concatenate([h1, h0], axis=2)
  bwd = jnp.concatenate([h0.transpose(0, 2, 1), h1.transpose(0, 2, 1)], axis=2)
  return fwd.astype(jnp.bfloat16), bwd.astype(jnp.bfloat16)


def _swizzled(minor: int, dtype=jnp.bfloat16):
  """Shared-memory tiling + swizzle for a wgmma operand whose last dimension is ``minor``."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _smem(shape, dtype=jnp.bfloat16):
  return plgpu.SMEM(shape, dtype, transforms=_swizzled(shape[-1], dtype))


def _pad(a, geo: _Geometry):
  return jnp.pad(a, ((0, 0), (0, geo.padded_length - geo.length), (0, 0)))


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



def _load_halo(geo, x1_gmem, v_gmem, first, b, cols, pair_gmem, pair_smems, g, halo, u_smem,
               bars):
  """Block pair(s) of group g into shared memory; u of chunk first-1 (zero at the start) into
  the upper half of [U_prev; U]."""
  c = geo.chunk
  rows = pl.ds(jnp.maximum(first - 1, 0) * c, c)
  copies = [(x1_gmem.at[b, rows, cols], halo.at[0]), (v_gmem.at[b, rows, cols], halo.at[1])]
  copies += [(src.at[g], dst) for src, dst in zip(pair_gmem, pair_smems)]
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(copies)):
    plgpu.barrier_wait(bars.at[i])
  u_prev = halo[0] * halo[1]
  u_smem[pl.ds(0, c), :] = jnp.where(first > 0, u_prev, jnp.zeros_like(u_prev))


def _store(val, stage_ref, dst_gmem):
  """Registers -> staged shared memory -> HBM (by hand: see gap 2 in the module docstring)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous copy out of stage_ref
  stage_ref[...] = val.astype(stage_ref.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(stage_ref, dst_gmem)


# ----------------------------------------------------------------------------- forward kernel


def _fwd_body(geo: _Geometry, has_skip: bool):
  c, w = geo.chunk, geo.width

  def kernel(pair_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, y_gmem,
             pair_smem, skip_smem, halo, u_smem, y_stage):
    b, t, first, g, cols = _program(geo)

    def scoped(bars):
      _load_halo(geo, x1_gmem, v_gmem, first, b, cols, (pair_gmem,), (pair_smem,), g, halo,
                 u_smem, bars)
      plgpu.copy_gmem_to_smem(skip_gmem.at[:, cols], skip_smem, bars.at[3])
      plgpu.barrier_wait(bars.at[3])

    pl.run_scoped(scoped, plgpu.Barrier(num_barriers=4))

    def step(idx, x1_ref, v_ref, x2_ref):
      (k,) = idx
      u = x1_ref[...] * v_ref[...]
      u_smem[pl.ds(c, c), :] = u
      plgpu.commit_smem()
      z = _matmul(pair_smem, u_smem, (c, w))
      if has_skip:
        z = z + skip_smem[...] * u.astype(f32)
      rows = pl.ds((first + k) * c, c)
      _store(x2_ref[...].astype(f32) * z, y_stage, y_gmem.at[b, rows, cols])
      u_smem[pl.ds(0, c), :] = u  # the next chunk's halo
      plgpu.commit_smem()

    spec = plgpu.BlockSpec((c, w), lambda k: (first + k, t),
                           transforms=_swizzled(w))
    plgpu.emit_pipeline(step, grid=(geo.seg_chunks,), in_specs=[spec] * 3,
                        max_concurrent_steps=geo.stages)(x1_gmem.at[b], v_gmem.at[b],
                                                         x2_gmem.at[b])
    plgpu.wait_smem_to_gmem(0)

  return kernel


def _launch(body, geo: _Geometry, out_type, scratch, interpret: bool, name: str):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch,
      grid=(geo.batch, geo.n_tiles, geo.n_segs), grid_names=("batch", "tile", "seg"),
      compiler_params=plgpu.CompilerParams(), kernel_name=name,
      interpret=plgpu.InterpretGPUParams() if interpret else None)


def _skip_rows(dskip, geo: _Geometry):
  """dskip [D] -> [c, D] float32 (broadcast over the chunk's rows once, in XLA: a [c, w] tile in
  shared memory is read with the same layout as the accumulator)."""
  skip = jnp.zeros((geo.channels,), f32) if dskip is None else dskip.astype(f32)
  return jnp.broadcast_to(skip[None, :], (geo.chunk, geo.channels))


def fwd(x1, v, x2, h, dskip, bs: MgpuBlockSizes, interpret: bool = False):
  """The forward launch: y [B, L, D] bfloat16."""
  geo = _geometry(x1.shape, h.shape, bs)
  c, w = geo.chunk, geo.width
  pair_f, _ = _toeplitz_pairs(h, c)
  xs = [_pad(a, geo) for a in (x1, v, x2)]
  scratch = (_smem((c, 2 * c)), plgpu.SMEM((c, w), f32), _smem((2, c, w)), _smem((2 * c, w)),
             _smem((c, w)))
  y = _launch(_fwd_body(geo, dskip is not None), geo,
              jax.ShapeDtypeStruct(xs[0].shape, x1.dtype), scratch, interpret,
              "gated_fir_fwd_mgpu")(pair_f, _skip_rows(dskip, geo), *xs)
  return y[:, :geo.length]


# ----------------------------------------------------------------------------- backward kernel


def _bwd_body(geo: _Geometry, has_skip: bool):
  c, w = geo.chunk, geo.width
  last = geo.padded_length // c - 1

  def kernel(pair_f_gmem, pair_b_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, dy_gmem,
             dx1_gmem, dv_gmem, dx2_gmem, p_gmem, s_gmem,
             pf_smem, pb_smem, skip_smem, halo, u_smem, dz_smem, stage, s_acc, p_stage):
    b, t, first, g, cols = _program(geo)
    s_idx = jax.lax.axis_index("seg")

    def scoped(bars):
      _load_halo(geo, x1_gmem, v_gmem, first, b, cols, (pair_f_gmem, pair_b_gmem),
                 (pf_smem, pb_smem), g, halo, u_smem, bars)
      plgpu.copy_gmem_to_smem(skip_gmem.at[:, cols], skip_smem, bars.at[4])
      plgpu.barrier_wait(bars.at[4])

    pl.run_scoped(scoped, plgpu.Barrier(num_barriers=5))
    s_acc[...] = jnp.zeros((c, w), f32)

    def run(p_acc):
      def step(idx, x1_ref, v_ref, x2_ref, dy_ref, x2n_ref, dyn_ref):
        (k,) = idx
        j = first + k
        x1, v = x1_ref[...], v_ref[...]
        u = x1 * v
        u_f = u.astype(f32)
        dy_f = dy_ref[...].astype(f32)
        dz_f = dy_f * x2_ref[...].astype(f32)
        dz_n = dyn_ref[...].astype(f32) * x2n_ref[...].astype(f32)
        u_smem[pl.ds(c, c), :] = u
        dz_smem[pl.ds(0, c), :] = dz_f.astype(dz_smem.dtype)
        dz_smem[pl.ds(c, c), :] = jnp.where(j < last, dz_n, 0.0).astype(dz_smem.dtype)
        plgpu.commit_smem()
        z = _matmul(pf_smem, u_smem, (c, w))
        du = _matmul(pb_smem, dz_smem, (c, w))
        # dh partial: P += dz_j @ [U_prev; U]^T, accumulated over this program's chunks.
        plgpu.wgmma(p_acc, dz_smem.at[pl.ds(0, c)], u_smem.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        if has_skip:
          skip = skip_smem[...]
          z = z + skip * u_f
          du = du + skip * dz_f
        s_acc[...] += dz_f * u_f
        rows = pl.ds(j * c, c)
        _store(dy_f * z, stage.at[0], dx2_gmem.at[b, rows, cols])
        _store(du * v.astype(f32), stage.at[1], dx1_gmem.at[b, rows, cols])
        _store(du * x1.astype(f32), stage.at[2], dv_gmem.at[b, rows, cols])
        u_smem[pl.ds(0, c), :] = u  # the next chunk's halo
        plgpu.commit_smem()

      cur = plgpu.BlockSpec((c, w), lambda k: (first + k, t), transforms=_swizzled(w))
      nxt = plgpu.BlockSpec((c, w), lambda k: (jnp.minimum(first + k + 1, last), t),
                            transforms=_swizzled(w))
      plgpu.emit_pipeline(step, grid=(geo.seg_chunks,), in_specs=[cur] * 4 + [nxt] * 2,
                          max_concurrent_steps=geo.stages)(
                              x1_gmem.at[b], v_gmem.at[b], x2_gmem.at[b], dy_gmem.at[b],
                              x2_gmem.at[b], dy_gmem.at[b])
      return p_acc[...]

    p = pl.run_scoped(run, plgpu.ACC((c, 2 * c), f32))
    plgpu.wait_smem_to_gmem(0)
    p_stage[...] = p
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(p_stage, p_gmem.at[b, t, s_idx])
    plgpu.copy_smem_to_gmem(s_acc, s_gmem.at[b, t, s_idx])
    plgpu.wait_smem_to_gmem(0)

  return kernel


def _reduce_dh(p, geo: _Geometry):
  """The reduction pass: partials [B, tiles, segs, c, 2c] -> dh [G, K] float32
  (``dh[g, k] = sum_i P[i, c + i - k]`` over the tiles of group g)."""
  c = geo.chunk
  m = p.sum(axis=(0, 2))  # [tiles, c, 2c]
  lag_col = c + np.arange(c)[:, None] - np.arange(geo.taps)[None, :]  # [i, k] -> column
  diag = jnp.take_along_axis(m, jnp.asarray(lag_col)[None], axis=2).sum(axis=1)  # [tiles, K]
  return diag.reshape(geo.groups, geo.tiles_per_group, geo.taps).sum(axis=1)


def bwd(x1, v, x2, h, dskip, dy, bs: MgpuBlockSizes, interpret: bool = False):
  """Gradients (dx1, dv, dx2, dh [G, K] float32, ddskip [D] float32) of ``fwd``."""
  geo = _geometry(x1.shape, h.shape, bs)
  c, w = geo.chunk, geo.width
  pair_f, pair_b = _toeplitz_pairs(h, c)
  xs = [_pad(a, geo) for a in (x1, v, x2, dy.astype(x1.dtype))]
  parts = (geo.batch, geo.n_tiles, geo.n_segs)
  out_type = tuple(jax.ShapeDtypeStruct(xs[0].shape, x1.dtype) for _ in range(3)) + (
      jax.ShapeDtypeStruct(parts + (c, 2 * c), f32), jax.ShapeDtypeStruct(parts + (c, w), f32))
  scratch = (_smem((c, 2 * c)), _smem((c, 2 * c)), plgpu.SMEM((c, w), f32), _smem((2, c, w)),
             _smem((2 * c, w)), _smem((2 * c, w)), _smem((3, c, w)), plgpu.SMEM((c, w), f32),
             plgpu.SMEM((c, 2 * c), f32))
  dx1, dv, dx2, p, s = _launch(_bwd_body(geo, dskip is not None), geo, out_type, scratch,
                               interpret, "gated_fir_bwd_mgpu")(
                                   pair_f, pair_b, _skip_rows(dskip, geo), *xs)
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

  x1, v, x2: [B, L, D] bfloat16; h: [G, K] (true convolution; D/G a multiple of 16, K <= 128);
  dskip: [D] or None. Returns [B, L, D] bfloat16; differentiable in all arrays. ``interpret``
  runs the kernels in Mosaic GPU interpret mode on CPU (slow, tests only).
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
