"""FFT-free Hyena-LI: the gated modal convolution as a chunked recurrence (Pallas / Triton).

    y = x2 * (h * u + dskip * u),   u = x1 * v,   h[d, t] = sum_n R[d, n] exp(lambda[d, n] t)

x1, v, x2: [B, L, D] (bf16 or f32); log_poles lambda and residues R: [D, N] float32 (lambda < 0);
dskip: [D] or None; initial state s0: [B, D, N] float32 or None. Returns y [B, L, D] in the input
dtype and the final state [B, D, N] float32 — the state of ``conv.modal_step`` after the last
token, ``s_n = exp(lambda_n) s_n + u``, so a prefill hands its state straight to decoding.

Why no FFT: h is a sum of N decaying exponentials, so ``h * u`` is a diagonal linear recurrence
with N float32 states per channel. Cut L into chunks of c tokens (t = t0 + i). Inside a chunk

    z[i] = sum_{j<=i} h[i-j] u[j]                      (intra: a c x c Toeplitz per channel)
         + sum_n R_n a_n^(i+1) s_n                     (inter: the state at t0 - 1, a = exp(lambda))
    s_n  <- a_n^c s_n + sum_j a_n^(c-1-j) u[j]         (state pass to the next chunk)

A program owns one batch row and a tile of channels and walks all chunks in order, carrying the
[tile, N] state in registers; the Toeplitz [c, c, tile] and the two decay tables
A[i] = a^(i+1), B[j] = a^(c-1-j) ([c, tile, N]) are built once per program. Every exponent is
>= 0, so poles near 1 and fast poles are equally safe. The last chunk may be partial (any L): its
rows past L are zero padding and its state update uses a^(r-1-j) for its r real rows.

The backward pass (``modal_scan_bwd.py``) runs the adjoint recurrence backward in time with the
same tables; ``modal_scan`` ties both together through ``jax.custom_vjp``.

Speed (H100, D = 4096, B = 1, bf16, L = 16K): 1.56 ms forward, 3.9 ms forward+backward — 2.7x and
3.0x the FFT path but ~8x the memory floor; the [c, tile, N] contractions, not the bytes, bound
it. ``modal_scan_serial.py`` steps the recurrence token by token instead (same contract).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.fir_conv import call_pallas
from sh2_jax import conv

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of one launch. chunk: tokens per chunk c; tile: channels per program (both powers of
  two; Triton tensors need power-of-two shapes); segment_chunks: chunks per sequence segment
  (0: one segment). With several segments the grid also runs over segments: a light first pass
  computes each segment's end state from zero, a tiny scan over segments gives each its incoming
  state, and the main pass runs all segments at once (B * D / tile programs alone would not fill
  the GPU at B = 1). The launch uses the largest divisor of the chunk count not above it.
  prefetch: load the next chunk's inputs one iteration ahead (hides the global-load latency
  behind this chunk's arithmetic)."""
  chunk: int = 16
  tile: int = 16
  segment_chunks: int = 0
  prefetch: bool = True
  num_warps: int = 4
  num_stages: int = 1


# Tuned on an H100 (benchmarks/modal_scan.py --mode all; width 4096, B = 1, L = 16K, bf16): the
# forward spread over 64-chunk segments with 2 warps (1.56 ms; 1.6-2.7 ms for the other 12
# shapes tried), the backward in one segment with 8 warps (2.3 ms of the 3.9 ms fwd+bwd).
DEFAULT_FWD = BlockSizes(chunk=16, tile=16, segment_chunks=64, num_warps=2)
DEFAULT_BWD = BlockSizes(chunk=16, tile=16, segment_chunks=0, num_warps=8)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shapes of one launch."""
  bs: BlockSizes
  batch: int
  length: int           # L
  channels: int         # D
  states: int           # N (real)
  padded_length: int    # multiple of chunk
  padded_channels: int  # multiple of tile
  padded_states: int    # power of two
  seg_chunks: int       # chunks per segment (divides num_chunks)

  @property
  def num_chunks(self):
    return self.padded_length // self.bs.chunk

  @property
  def num_segments(self):
    return self.num_chunks // self.seg_chunks

  @property
  def tail(self):
    """Real rows r of the last chunk (1..c)."""
    return self.length - (self.num_chunks - 1) * self.bs.chunk

  @property
  def segment_length(self):
    return self.seg_chunks * self.bs.chunk

  @property
  def grid(self):
    return (self.batch, self.padded_channels // self.bs.tile, self.num_segments)


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def make_geometry(x_shape, poles_shape, bs: BlockSizes) -> Geometry:
  batch, length, channels = x_shape
  for name, val in (("chunk", bs.chunk), ("tile", bs.tile)):
    if val < 2 or val & (val - 1):
      raise ValueError(f"BlockSizes.{name}={val} must be a power of two >= 2")
  tile = bs.tile
  while tile > 2 and tile // 2 >= channels:  # narrow tiles for tiny D: less padding
    tile //= 2
  bs = dataclasses.replace(bs, tile=tile)
  num_chunks = -(-length // bs.chunk)
  want = bs.segment_chunks or num_chunks
  seg = max(d for d in range(1, min(want, num_chunks) + 1) if num_chunks % d == 0)
  states = poles_shape[1]
  return Geometry(bs, batch, length, channels, states, num_chunks * bs.chunk,
                  -(-channels // tile) * tile, max(2, _pow2(states)), seg)


# ----------------------------------------------------------------------------- shared pieces


def decay_tables(lam, chunk: int, rows: int | None = None):
  """From lambda [tile, N]: A[i] = a^(i+1) and B[j] = a^(rows-1-j) (zero for j >= rows),
  both [c, tile, N], and a^rows [tile, N]. ``rows`` defaults to c (a full chunk)."""
  rows = chunk if rows is None else rows
  i = jax.lax.broadcasted_iota(jnp.int32, (chunk, 1, 1), 0)
  a_tab = jnp.exp(lam[None] * (i + 1).astype(F32))
  age = (rows - 1 - i)
  b_tab = jnp.where(age >= 0, jnp.exp(lam[None] * jnp.maximum(age, 0).astype(F32)), 0.0)
  return a_tab, b_tab, jnp.exp(lam * float(rows))


def column(x, n: int):
  """x[:, n] of a [tile, N] register tensor, as [tile] (a masked sum: no register gathers)."""
  sel = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == n
  return jnp.sum(jnp.where(sel, x, 0.0), axis=1)


def lag_table(lam, res, chunk: int, weight_lag: bool = False):
  """The per-channel Toeplitz T[i, j, d] = sum_n w(i-j) R[d,n] exp(lambda[d,n] (i-j)) for i >= j
  (zero above the diagonal), [c, c, tile]; w(k) = k with ``weight_lag`` else 1. lam, res:
  [tile, N]. Built once per program: N passes of c*c*tile exponentials."""
  i = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk, 1), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk, 1), 1)
  lag = jnp.maximum(i - j, 0).astype(F32)
  out = None
  for n in range(lam.shape[1]):
    term = column(res, n)[None, None, :] * jnp.exp(column(lam, n)[None, None, :] * lag)
    if weight_lag:
      term = term * lag
    out = term if out is None else out + term
  return jnp.where(i >= j, out, 0.0)


def pad_inputs(geo: Geometry, *xs):
  """Zero-pad [B, L, D] arrays to the launch's padded length and channels."""
  pl_, pd = geo.padded_length - geo.length, geo.padded_channels - geo.channels
  if not (pl_ or pd):
    return xs
  return tuple(jnp.pad(x, ((0, 0), (0, pl_), (0, pd))) for x in xs)


def pad_params(geo: Geometry, log_poles, residues, dskip):
  """Poles/residues to [Dp, Np] float32 (padding: lambda = -1, R = 0: inert), dskip to [Dp]."""
  pd, pn = geo.padded_channels - geo.channels, geo.padded_states - geo.states
  lam = jnp.pad(log_poles.astype(F32), ((0, pd), (0, pn)), constant_values=-1.0)
  res = jnp.pad(residues.astype(F32), ((0, pd), (0, pn)))
  skip = (jnp.zeros((geo.padded_channels,), F32) if dskip is None else
          jnp.pad(dskip.astype(F32), (0, pd)))
  return lam, res, skip


def pad_state(geo: Geometry, state):
  """[B, D, N] float32 state (or None = zeros) to [B, Dp, Np]."""
  if state is None:
    return jnp.zeros((geo.batch, geo.padded_channels, geo.padded_states), F32)
  return jnp.pad(state.astype(F32), ((0, 0), (0, geo.padded_channels - geo.channels),
                                     (0, geo.padded_states - geo.states)))


def segment_tail(lam, geo: Geometry, si, b_tab, a_c):
  """(B table, a^rows, rows) of a segment's last chunk: the partial tail's in the last segment,
  a full chunk's elsewhere (si is the traced segment index)."""
  c = geo.bs.chunk
  if geo.tail == c:
    return b_tab, a_c, c
  _, b_r, a_r = decay_tables(lam, c, geo.tail)
  if geo.num_segments == 1:
    return b_r, a_r, geo.tail
  last = si == geo.num_segments - 1
  return (jnp.where(last, b_r, b_tab), jnp.where(last, a_r, a_c),
          jnp.where(last, geo.tail, c))


def walk(load, step, start, count: int, direction: int, carry, geo: Geometry):
  """carry = step(k, carry, load(k)) for k = start, start + direction, ... (count chunks).
  Returns (carry, the loaded chunk start + count * direction (clamped in range) or None).
  With ``prefetch`` each iteration issues the next chunk's loads before its arithmetic."""
  clamp = lambda k: jnp.clip(k, 0, geo.num_chunks - 1)
  if geo.bs.prefetch:
    def body(i, state):
      carry, cur = state
      k = start + direction * i
      nxt = load(clamp(k + direction))
      return step(k, carry, cur), nxt
    return jax.lax.fori_loop(0, count, body, (carry, load(clamp(start))))
  carry = jax.lax.fori_loop(
      0, count, lambda i, cr: step(start + direction * i, cr, load(start + direction * i)), carry)
  return carry, None


# ----------------------------------------------------------------------------- forward kernels


def _fwd_kernel(lam_ref, res_ref, skip_ref, sin_ref, x1_ref, v_ref, x2_ref, y_ref, sT_ref,
                *z_ref, geo: Geometry):
  bs = geo.bs
  c, tile = bs.chunk, bs.tile
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(ti * tile, tile)
  lam = lam_ref[cols, :]
  res = res_ref[cols, :]
  skip = skip_ref[cols][None, :]
  a_tab, b_tab, a_c = decay_tables(lam, c)
  toe = lag_table(lam, res, c)

  def load(k):
    rows = pl.ds(k * c, c)
    return x1_ref[b, rows, cols], v_ref[b, rows, cols], x2_ref[b, rows, cols]

  def step(k, s, loaded, b_k=b_tab, a_k=a_c):
    x1, v, x2 = loaded
    u = (x1 * v).astype(F32)                                         # [c, tile]
    z = (jnp.sum(toe * u[None, :, :], axis=1)                        # intra-chunk Toeplitz
         + jnp.sum(a_tab * (res * s)[None], axis=2)                  # the carried state
         + skip * u)
    rows = pl.ds(k * c, c)
    y_ref[b, rows, cols] = (x2.astype(F32) * z).astype(y_ref.dtype)
    if z_ref:
      z_ref[0][b, rows, cols] = z.astype(z_ref[0].dtype)
    return a_k * s + jnp.sum(b_k * u[:, :, None], axis=0)

  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1
  s, cur = walk(load, step, first, geo.seg_chunks - 1, 1, sin_ref[b, si, cols, :], geo)
  b_last, a_last, _ = segment_tail(lam, geo, si, b_tab, a_c)
  sT_ref[b, si, cols, :] = step(last, s, load(last) if cur is None else cur, b_last, a_last)


def _state_kernel(lam_ref, x1_ref, v_ref, e_ref, *, geo: Geometry):
  """First pass of the segmented launch: each segment's end state from a zero state."""
  c, tile = geo.bs.chunk, geo.bs.tile
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(ti * tile, tile)
  lam = lam_ref[cols, :]
  _, b_tab, a_c = decay_tables(lam, c)

  def load(k):
    rows = pl.ds(k * c, c)
    return x1_ref[b, rows, cols], v_ref[b, rows, cols]

  def step(k, s, loaded, b_k=b_tab, a_k=a_c):
    u = (loaded[0] * loaded[1]).astype(F32)
    return a_k * s + jnp.sum(b_k * u[:, :, None], axis=0)

  first = si * geo.seg_chunks
  last = first + geo.seg_chunks - 1
  s, cur = walk(load, step, first, geo.seg_chunks - 1, 1, jnp.zeros(lam.shape, F32), geo)
  b_last, a_last, _ = segment_tail(lam, geo, si, b_tab, a_c)
  e_ref[b, si, cols, :] = step(last, s, load(last) if cur is None else cur, b_last, a_last)


def segment_states(geo: Geometry, lam, end_states, s0):
  """Incoming state of every segment from the from-zero end states [B, S, Dp, Np]:
  s_in[0] = s0, s_in[k+1] = a^Ls s_in[k] + e[k] (a sequential scan over S tiny states)."""
  decay = jnp.exp(lam * float(geo.segment_length))

  def body(s, e):
    return decay * s + e, s

  _, s_in = jax.lax.scan(body, s0, jnp.moveaxis(end_states, 1, 0))
  return jnp.moveaxis(s_in, 0, 1)


def fwd(x1, v, x2, log_poles, residues, dskip, state, bs: BlockSizes, interpret: bool = False,
        poison: bool = False, save_z: bool = False):
  """The forward launch(es). Returns (y, final_state[, z]); z = h*u + dskip*u is the
  backward's residual for dx2."""
  geo = make_geometry(x1.shape, log_poles.shape, bs)
  lam, res, skip = pad_params(geo, log_poles, residues, dskip)
  xs = pad_inputs(geo, x1, v, x2)
  s0 = pad_state(geo, state)
  seg_shape = jax.ShapeDtypeStruct((geo.batch, geo.num_segments) + s0.shape[1:], F32)
  if geo.num_segments == 1:
    s_in = s0[:, None]
  else:
    (ends,) = call_pallas(functools.partial(_state_kernel, geo=geo), (seg_shape,), geo.grid,
                          geo.bs, interpret, "modal_scan_states", poison, lam, *xs[:2])
    s_in = segment_states(geo, lam, ends, s0)
  shape = xs[0].shape
  out_shape = [jax.ShapeDtypeStruct(shape, x1.dtype), seg_shape]
  if save_z:
    out_shape.append(jax.ShapeDtypeStruct(shape, x1.dtype))
  outs = call_pallas(functools.partial(_fwd_kernel, geo=geo), tuple(out_shape), geo.grid,
                     geo.bs, interpret, "modal_scan_fwd", poison, lam, res, skip, s_in, *xs)
  y = outs[0][:, :geo.length, :geo.channels]
  s_out = outs[1][:, -1, :geo.channels, :geo.states]
  if save_z:
    return y, s_out, outs[2][:, :geo.length, :geo.channels]
  return y, s_out


# ----------------------------------------------------------------------------- public op


def _check(x1, v, x2, log_poles, residues, dskip, state):
  if x1.ndim != 3 or x1.shape != v.shape or x1.shape != x2.shape:
    raise ValueError(f"x1, v, x2 must share one shape [B, L, D]; got {x1.shape}, {v.shape}, "
                     f"{x2.shape}")
  if not (x1.dtype == v.dtype == x2.dtype) or x1.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x1, v, x2 must all be bfloat16 or float32; got {x1.dtype}, {v.dtype}, "
                     f"{x2.dtype}")
  batch, _, d = x1.shape
  if log_poles.ndim != 2 or log_poles.shape[0] != d or residues.shape != log_poles.shape:
    raise ValueError(f"log_poles and residues must both be [D={d}, N]; got {log_poles.shape} "
                     f"and {residues.shape}")
  if dskip is not None and dskip.shape != (d,):
    raise ValueError(f"dskip must be [D]=[{d}]; got shape {dskip.shape}")
  if state is not None and state.shape != (batch, d, log_poles.shape[1]):
    raise ValueError(f"initial state must be [B, D, N]={[batch, d, log_poles.shape[1]]}; got "
                     f"shape {state.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _modal_scan(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs_fwd, _, has_skip, interpret, poison = opts
  return fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state, bs_fwd,
             interpret, poison)


def _modal_scan_fwd(x1, v, x2, log_poles, residues, dskip, state, opts):
  bs_fwd, _, has_skip, interpret, poison = opts
  y, s_out, z = fwd(x1, v, x2, log_poles, residues, dskip if has_skip else None, state,
                    bs_fwd, interpret, poison, save_z=True)
  return (y, s_out), (x1, v, x2, log_poles, residues, dskip, state, z)


def _modal_scan_bwd(opts, res, cts):
  from pallas_kernels import modal_scan_bwd  # the backward kernel; imported late (no cycle)
  _, bs_bwd, has_skip, interpret, poison = opts
  x1, v, x2, log_poles, residues, dskip, state, z = res
  dy, ds_out = cts
  dx1, dv, dx2, dlam, dres, ddskip, dstate = modal_scan_bwd.bwd(
      x1, v, x2, log_poles, residues, dskip if has_skip else None, state, z, dy, ds_out, bs_bwd,
      interpret, poison)
  return (dx1, dv, dx2, dlam.astype(log_poles.dtype), dres.astype(residues.dtype),
          ddskip.astype(dskip.dtype), dstate.astype(state.dtype))


_modal_scan.defvjp(_modal_scan_fwd, _modal_scan_bwd)


def modal_scan(x1: jax.Array, v: jax.Array, x2: jax.Array, log_poles: jax.Array,
               residues: jax.Array, dskip: jax.Array | None = None,
               initial_state: jax.Array | None = None, *, interpret: bool = False,
               block_sizes: BlockSizes | None = None, bwd_block_sizes: BlockSizes | None = None,
               poison: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(x2 * (h_modal * (x1 * v) + dskip * x1 * v), final_state)`` without FFTs.

  x1, v, x2: [B, L, D] (same dtype, bf16 or f32); log_poles, residues: [D, N]; dskip: [D] or
  None; initial_state: [B, D, N] float32 or None (zeros). Differentiable in every array
  argument (``jax.custom_vjp``); ``interpret`` runs the Pallas interpreter (CPU tests);
  ``poison`` starts the outputs as NaN (tests).
  """
  _check(x1, v, x2, log_poles, residues, dskip, initial_state)
  opts = (block_sizes or DEFAULT_FWD, bwd_block_sizes or DEFAULT_BWD, dskip is not None,
          interpret, poison)
  d = jnp.zeros((x1.shape[2],), F32) if dskip is None else dskip
  s0 = (jnp.zeros((x1.shape[0], x1.shape[2], log_poles.shape[1]), F32)
        if initial_state is None else initial_state)
  return _modal_scan(x1, v, x2, log_poles, residues, d, s0, opts)


def gated_modal_scan(x1, v, x2, log_poles, residues, dskip=None, **kwargs) -> jax.Array:
  """The LI core ``y`` alone (the dispatch entry point): ``modal_scan(...)[0]``."""
  return modal_scan(x1, v, x2, log_poles, residues, dskip, **kwargs)[0]


# ----------------------------------------------------------------------------- reference


def state_response(state: jax.Array, log_poles: jax.Array, residues: jax.Array, length: int,
                   chunk: int = 256) -> jax.Array:
  """What an initial state s (at position -1) adds to the filter output:
  ``r[b, t, d] = sum_n R[d,n] exp(lambda[d,n] (t+1)) s[b,d,n]``, [B, L, D] float32.

  Chunked so that no [L, D, N] table is formed: r[t0 + i] = sum_n (R a^(i+1))[i] (a^t0 s),
  every exponent >= 0. The context-parallel state passing adds this as its correction.
  """
  lam = log_poles.astype(F32)
  chunk = min(chunk, length)
  chunks = -(-length // chunk)
  hi = jax.lax.Precision.HIGHEST
  i = jnp.arange(1, chunk + 1, dtype=F32)[:, None, None]
  inner = residues.astype(F32)[None] * jnp.exp(lam[None] * i)               # [c, D, N]
  t0 = (jnp.arange(chunks, dtype=F32) * chunk)[:, None, None]
  outer = jnp.exp(lam[None] * t0)[None] * state.astype(F32)[:, None]       # [B, M, D, N]
  r = jnp.einsum("idn,bmdn->bmid", inner, outer, precision=hi)
  return r.reshape(state.shape[0], chunks * chunk, -1)[:, :length]


def modal_scan_reference(x1, v, x2, log_poles, residues, dskip=None, initial_state=None):
  """Plain-jnp reference of ``modal_scan`` through the FFT path (``conv.fft_conv`` of
  ``conv.modal_filter``) and ``conv.modal_state``: (y, final_state)."""
  length = x1.shape[1]
  h = conv.modal_filter(log_poles, residues, length)
  lam = log_poles.astype(F32)

  def filt(u):
    y = conv.fft_conv(u, h).astype(F32)
    if initial_state is not None:
      y = y + state_response(initial_state, log_poles, residues, length)
    return y

  y = conv.gated_conv(x1, v, x2, filt, dskip)
  s = conv.modal_state(x1 * v, log_poles)
  if initial_state is not None:
    s = s + jnp.exp(lam * length)[None] * initial_state.astype(F32)
  return y, s
