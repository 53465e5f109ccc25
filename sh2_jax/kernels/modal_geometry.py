"""The tiling of the modal-scan kernels (``modal_scan.py``, ``modal_scan_bwd.py``,
``modal_scan_serial.py``): block sizes, the launch geometry, input checks, padding, and the
decay tables and chunk walk that the forward and backward kernels share."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sh2_jax.kernels._pallas import check_gated_inputs

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


def check_inputs(x1, v, x2, log_poles, residues, dskip, state):
  check_gated_inputs(x1, v, x2)
  batch, _, d = x1.shape
  if log_poles.ndim != 2 or log_poles.shape[0] != d or residues.shape != log_poles.shape:
    raise ValueError(f"log_poles and residues must both be [D={d}, N]; got {log_poles.shape} "
                     f"and {residues.shape}")
  if dskip is not None and dskip.shape != (d,):
    raise ValueError(f"dskip must be [D]=[{d}]; got shape {dskip.shape}")
  if state is not None and state.shape != (batch, d, log_poles.shape[1]):
    raise ValueError(f"initial state must be [B, D, N]={[batch, d, log_poles.shape[1]]}; got "
                     f"shape {state.shape}")
