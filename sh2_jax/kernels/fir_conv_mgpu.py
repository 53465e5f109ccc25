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
``H_m[i, i'] = h[i + m c - i']`` (zero outside 0..K-1): n + 1 wgmmas of depth c accumulating in
one float32 accumulator, the [c, c] blocks H_m of the program's group the A operands (built once
by XLA, [G, n+1, c, c], a few KiB per group, TMA-copied into shared memory once per program;
of the last, H_n, only its k nonzero columns — its top-right corner, k = K - 1 - (n-1)c rounded
up to 16: 16 of 64 at SE — so that wgmma has depth k),
the window of the last n+1 chunks of u the B operands: a [n+1, c, w] shared-memory buffer
(the halo of K-1 past tokens, as the Triton kernel carries ``u_prev``: a program loads the n
chunks before its first once, in its prologue, one batch of TMA copies with one wait for the
band blocks, dskip rows and halo) that either slides by one chunk per step or, with
``ring``, keeps chunk q in slot q mod (n+1) so nothing moves. A program owns ``tiles`` channel
tiles of ``w`` channels (each within one group: the wgmma N) and ``seg_chunks`` consecutive
chunks of one batch row; the gates are fused so u and h*u never touch HBM. u is the float32
product of the bf16 loads (the skip term and ddskip use it exactly); only the wgmma operand is
rounded to bf16. Outputs are staged in shared memory (``store_slots`` buffers each) and copied
out by TMA, one fence per step.

Backward (dz = dy * x2): ``dx2 = dy * z`` (z recomputed: n + 1 wgmmas), ``du = sum_m H_m^T
dz_{j+m} + dskip * dz`` (the same blocks read transposed — wgmma transposes a 16-bit A in
hardware — on a window of dz ahead of the step: each step reads x2, dy of chunk j+n and keeps
windows of dz in bf16 for the wgmmas and of x2 and dy: dz = dy * x2 in float32 for the skip
term and ddskip (exact for bf16 factors), dx2 = dy * z; dx1 = du * v, dv = du * x1), and for
dh n + 1 more wgmmas per chunk accumulating ``P_m = sum_j dz_j @ U_{j-m}^T`` ([c, c] float32
each, as two [c, c/2] halves, in accumulator registers across the program's chunks; the tile's
P is [P_n | … | P_0], [c, (n+1)c], staged out half a block at a time): the token lag of entry
(i, r) is n c + i - r, so ``dh[g, k] = sum_i P[i, n c + i - k]`` over the programs of group g. The
ddskip partial sum dz * u is a register carry of the pipeline. Each program writes its P and
its [c, w] float32 ddskip partial; ``reduce_dh`` sums them (no atomics), as
``fir_conv_bwd.reduce_dh`` does for the Triton kernel. Like the Triton backward (which carries
the same chunks in registers) it reads each of x1, v, x2, dy once and writes dx1, dv, dx2 once,
plus the n chunks of halo per program. The backward lives in ``fir_conv_mgpu_bwd.py``, the
tiling and the pieces both directions share in ``fir_layout_mgpu.py``.

Limits (errors, never silent fallbacks): bfloat16 only (a float32 wgmma is tf32); the group
size D/G must be a multiple of 16 (the wgmma N, and the K of the dh wgmma) — Evo 2 1B's 15
channels per group needs the Triton kernel's aligned layout, not written here; K <= 129.

Measured (one H200, 2026-12-01, width 4096, 256 groups, L = 16K, the first compiled run, before
the variants): forward 0.225 ms SE / 0.231 ms MR against a floor of 0.162 ms, forward+backward
1.04 / 1.31 ms; the backward alone is ~3x its floor (0.284 ms) — latency-bound: each step
waited for its previous TMA store before each of its three stores, slid four windows through
registers and read back a shared-memory ddskip accumulator, and its shared memory (86 KiB SE)
allowed 2 programs per SM. Now one wait per step covers all its stores, the ddskip partial is a
register carry, and the footprint is smaller (one set of band blocks, an x2 window instead of
float32 dz, dskip rows in registers, scoped prologue / dh staging, the last band's k columns:
SE 50 KiB, 4 programs per SM; the forward 28 KiB, 7); the variants in ``MgpuBlockSizes``
(``tiles``, ``ring``, ``store_slots``, ``wide``, ``stages``, ``seg_chunks``; the backward's
may differ: ``bwd_block_sizes``) attack the rest; ``benchmarks/fir_conv.py --mode
mgpu_variants`` times them against the floor, and ``default_block_sizes`` takes the fastest per
direction and filter length (H200, fwd / fwd+bwd: SE 0.188 / 0.590 ms, MR 0.202 / 0.696 ms at
16K, 1.447 / 4.935 and 1.495 / 5.165 ms at 128K; benchmarks/RESULTS.md). Still one warpgroup
per program (no warp specialisation: the TMA loads are already asynchronous; the default
forward runs one 4-tile program per SM, 136 / 200 KiB of shared memory, and wins by its wide
boxes); the dh partials are [c, (n+1)c] float32 per program (~17 MB SE / ~13 MB MR at L = 16K,
D = 4096, with the default 128- / 512-chunk programs, beside 512 MB of inputs; longer segments
divide them, and the SE reduction gathers only its 7 diagonals).

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
first three are checked on CPU too: ``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``
runs the Mosaic GPU lowering and layout inference without a GPU (tests/kernels), and caught
things interpret mode accepts: a scalar ``jnp.where`` over a [c, w] array ("Implicit broadcast
not implemented with warpgroup semantics"; the window fills pick the write with ``lax.cond``),
wgmma operands with different swizzles (layout inference fails; every operand here uses the
channel tile's swizzle), and a TMA copy of a whole [n+1, c, c] tiled block stack ("Async copies
only support striding up to 5 dimensions"; the blocks are copied one by one). The lowering
also sizes shared memory (scoped buffers — the halo staging, the input pipeline, the dh
staging — share one region); ``smem_bytes`` is that size up to the barriers (tested), and
launches over ``SMEM_LIMIT`` are refused. Only the PTX compile and registers need the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sh2_jax.kernels._pallas import check_gated_inputs
from sh2_jax.kernels.fir_conv_mgpu_bwd import bwd
from sh2_jax.kernels.fir_layout_mgpu import (SMEM_LIMIT, Geometry, MgpuBlockSizes, band_a,
                                             band_copies, band_rows, default_block_sizes, f32,
                                             geometry, launch, mgpu_misfit, pad, past_rows,
                                             product, program, prologue, put, skip_rows, slide,
                                             slot, smem, smem_bytes, split_streams,
                                             stage_buffer, store, stream_specs)

__all__ = ["SMEM_LIMIT", "MgpuBlockSizes", "bwd", "default_block_sizes", "fwd",
           "gated_fir_conv_mgpu", "mgpu_misfit", "smem_bytes"]


# ----------------------------------------------------------------------------- forward kernel


def _fwd_body(geo: Geometry, has_skip: bool):
  c, w, n, nt = geo.chunk, geo.width, geo.bands, geo.tiles

  def kernel(band_gmem, skip_gmem, x1_gmem, v_gmem, x2_gmem, y_gmem,
             band_smem, tail_f, u_win, y_stage):
    b, first, tiles = program(geo)
    skips = prologue(geo, b, tiles, band_copies(geo, tiles, band_gmem, band_smem, tail_f),
                     skip_gmem if has_skip else None,
                     [(x1_gmem, v_gmem, cols, first - n + m,
                       [u_win.at[i, slot(geo, first, m - n)]], [product])
                      for i, (_, _, cols) in enumerate(tiles) for m in range(n)])

    def step(idx, *refs):
      (k,) = idx
      j = first + k
      x1s, vs, x2s = split_streams(geo, refs, 3)
      # u in float32 from the bf16 loads (the skip term uses it exactly); bf16 only as the
      # wgmma operand
      us = [x1[...].astype(f32) * v[...].astype(f32) for x1, v in zip(x1s, vs)]
      put([u_win.at[i, slot(geo, j, 0)] for i in range(nt)], us)
      plgpu.commit_smem()

      def mm(*accs):  # every tile's bands, issued back to back; reading waits for all
        for i, acc in enumerate(accs):
          for m in range(n + 1):
            plgpu.wgmma(acc, band_a(geo, band_smem, tail_f, i, m),
                        u_win.at[i, slot(geo, j, -m)].at[past_rows(geo, m)])
        return [acc[...] for acc in accs]
      zs = pl.run_scoped(mm, *[plgpu.ACC((c, w), f32)] * nt)
      ys = []
      for i in range(nt):
        z = zs[i] + skips[i] * us[i] if has_skip else zs[i]
        ys.append(x2s[i][...].astype(f32) * z)
      store([ys], y_stage, [y_gmem], b, pl.ds(j * c, c), tiles, k, geo)
      slide([u_win.at[i] for i in range(nt)], geo)

    specs = stream_specs(geo, tiles, lambda k: first + k)
    plgpu.emit_pipeline(step, grid=(geo.seg_chunks,), in_specs=specs * 3,
                        max_concurrent_steps=geo.stages)(
                            *[a.at[b] for a in (x1_gmem, v_gmem, x2_gmem) for _ in specs])
    plgpu.wait_smem_to_gmem(0)

  return kernel


def fwd(x1, v, x2, h, dskip, bs: MgpuBlockSizes, interpret: bool = False):
  """The forward launch: y [B, L, D] bfloat16."""
  geo = geometry(x1.shape, h.shape, bs)
  c, w, n, nt = geo.chunk, geo.width, geo.bands, geo.tiles
  xs = [pad(a, geo) for a in (x1, v, x2)]
  scratch = (smem((nt, n, c, c), w), smem((nt, c, geo.tail), w), smem((nt, n + 1, c, w)),
             stage_buffer(geo, 1))
  y = launch(_fwd_body(geo, dskip is not None), geo,
             jax.ShapeDtypeStruct(xs[0].shape, x1.dtype), scratch, interpret,
             "gated_fir_fwd_mgpu")(band_rows(h, c, n), skip_rows(dskip, geo), *xs)
  return y[:, :geo.length]


# ----------------------------------------------------------------------------- public op


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gated_fir(x1, v, x2, h, dskip, opts):
  bs, _, has_skip, interpret = opts
  return fwd(x1, v, x2, h, dskip if has_skip else None, bs, interpret)


def _gated_fir_fwd(x1, v, x2, h, dskip, opts):
  return _gated_fir(x1, v, x2, h, dskip, opts), (x1, v, x2, h, dskip)


def _gated_fir_bwd(opts, res, dy):
  bs, bs_b, has_skip, interpret = opts
  x1, v, x2, h, dskip = res
  reason = mgpu_misfit(x1.shape, h.shape, x1.dtype, bs, bwd_bs=bs_b)
  if reason is not None:
    raise ValueError(f"gated_fir_conv_mgpu cannot differentiate this layer: {reason}")
  dx1, dv, dx2, dh, dd = bwd(x1, v, x2, h, dskip if has_skip else None, dy, bs_b, interpret)
  return dx1, dv, dx2, dh.astype(h.dtype), dd.astype(dskip.dtype)


_gated_fir.defvjp(_gated_fir_fwd, _gated_fir_bwd)


def gated_fir_conv_mgpu(x1: jax.Array, v: jax.Array, x2: jax.Array, h: jax.Array,
                        dskip: jax.Array | None = None, *, interpret: bool = False,
                        block_sizes: MgpuBlockSizes | None = None,
                        bwd_block_sizes: MgpuBlockSizes | None = None) -> jax.Array:
  """``x2 * (h * (x1 * v) + dskip * (x1 * v))``, causal, by the Mosaic GPU kernels.

  x1, v, x2: [B, L, D] bfloat16; h: [G, K] (true convolution; D/G a multiple of 16, K <= 129);
  dskip: [D] or None. Returns [B, L, D] bfloat16; differentiable in all arrays. ``interpret``
  runs the kernels in Mosaic GPU interpret mode on CPU (slow, tests only). Block sizes default
  to ``default_block_sizes`` of each direction (the backward's to ``block_sizes`` when only that
  is given); a geometry they cannot run is a ValueError naming why.
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
  gs = x1.shape[2] // max(h.shape[0], 1)
  d = x1.shape[2]
  bs = block_sizes or default_block_sizes(gs, h.shape[1], channels=d)
  bs_b = bwd_block_sizes or block_sizes or default_block_sizes(gs, h.shape[1], backward=True,
                                                               channels=d)
  reason = mgpu_misfit(x1.shape, h.shape, x1.dtype, bs, backward=False)
  if reason is not None:
    raise ValueError(f"gated_fir_conv_mgpu cannot run this layer: {reason}")
  has_skip = dskip is not None
  if dskip is None:
    dskip = jnp.zeros((x1.shape[2],), f32)
  return _gated_fir(x1, v, x2, h, dskip, (bs, bs_b, has_skip, interpret))
