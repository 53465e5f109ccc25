"""Gated grouped FIR convolution as a two-stage blocked Pallas (Triton) kernel, with its reference.

    y = x2 * (h * u + dskip * u),   u = x1 * v,   causal, per channel

x1, v, x2: [B, L, D] (bf16 or f32); h: [G, K] grouped filters in true-convolution orientation
(``h[:, 0]`` multiplies the current token; filter g serves channels g*D/G … (g+1)*D/G - 1);
dskip: [D] or None. Float32 accumulation, y in the input dtype.

Algorithm (docs/architecture.md, "The two-stage blocked convolution"): cut L into chunks of c >= K tokens. The causal
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

The tiling, the footprint model and the Toeplitz gathers live in ``fir_layout.py`` (shared with
the backward); the backward kernels in ``fir_conv_bwd.py``; this file holds the forward kernel,
``gated_fir_conv`` tying both together through ``jax.custom_vjp``, and the reference.
"""


from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sh2_jax.kernels import fir_conv_bwd
from sh2_jax.kernels._pallas import (call_pallas, check_gated_inputs, dot, dot_precision,
                                     store)
from sh2_jax.kernels.fir_layout import (BlockSizes, DoesNotFit, Layout, choose_block_sizes,
                                        filter_table, make_layout, pad_to, subblock,
                                        toeplitz_slots)
from sh2_jax.ops import fir

__all__ = ["BlockSizes", "DoesNotFit", "choose_block_sizes", "fwd", "gated_fir_conv",
           "gated_fir_conv_reference"]

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
  check_gated_inputs(x1, v, x2)
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
                     f"sh2_jax.ops.fir.gated_conv")
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
  return fir.gated_conv(x1, v, x2, functools.partial(fir.fir_conv, h=h), dskip)
