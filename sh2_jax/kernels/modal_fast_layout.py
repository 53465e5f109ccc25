"""The tiling of the fast token-serial LI kernels (``modal_fast.py``, ``modal_fast_bwd.py``):
block sizes, the launch geometry, the walk over a segment's tokens, per-state row I/O, and the
scan that joins the segments (a small Pallas kernel, one launch).

Layout: every per-channel [D, N] quantity (poles, residues, segment states) is held transposed,
N rows of D channels, so a program's states are N separate [tile] vectors: every operation of the
recurrence is elementwise on [tile] vectors (no reduction over N, no 2D register tensor whose
layout Triton could spread across lanes), and every state load or store is one contiguous row.
Segment states are [B, S, N, Dp] float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sh2_jax.kernels._pallas import call_pallas

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FastBlocks:
  """Tiling of the fast LI kernels. tile: channels per program (a power of two; one or more per
  lane); chunk: tokens per unrolled loop body; segment: tokens per sequence segment (rounded
  down to a multiple of chunk; segments run in parallel, joined by the segment scan); prefetch:
  load the next chunk's inputs one loop iteration ahead of this chunk's arithmetic;
  fuse_adjoint: the backward's forward-in-time pass also sums each segment's adjoint end state
  (two more multiply-adds per state and token, saving a pass over x2 and dy); horner: that sum
  by chunks, sum_i a^i g_i in Horner form (c + 1 operations per state and chunk instead of 2c,
  N more registers for a^c); num_warps,
  num_stages: Triton's; bwd_tile, bwd_warps: the backward kernels' tile and warps (0: the
  forward's) — they carry up to 7N states per channel against the forward's N, so fewer
  channels per lane keep them out of local memory; min_programs: short sequences get shorter
  segments (halved, down to 8 chunks) until the grid has at least this many programs (0: the
  segment as given)."""
  tile: int = 128
  chunk: int = 8
  segment: int = 512
  num_warps: int = 4
  prefetch: bool = True
  fuse_adjoint: bool = True
  horner: bool = True
  bwd_tile: int = 0
  bwd_warps: int = 0
  min_programs: int = 1024
  num_stages: int = 1

  def backward(self) -> "FastBlocks":
    """The block sizes of the backward kernels."""
    return dataclasses.replace(self, tile=self.bwd_tile or self.tile,
                               num_warps=self.bwd_warps or self.num_warps, bwd_tile=0,
                               bwd_warps=0)

  def label(self) -> str:
    bwd = self.backward()
    return (f"t{self.tile}/c{self.chunk}/seg{self.segment}/w{self.num_warps}"
            + (f"/bwd t{bwd.tile} w{bwd.num_warps}" if (bwd.tile, bwd.num_warps) !=
               (self.tile, self.num_warps) else "")
            + ("" if self.prefetch else "/nopf") + ("" if self.fuse_adjoint else "/adjpass")
            + ("/no horner" if self.fuse_adjoint and not self.horner else ""))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shapes of one launch."""
  bs: FastBlocks
  batch: int
  length: int           # L
  channels: int         # D
  states: int           # N
  padded_length: int    # multiple of chunk
  padded_channels: int  # multiple of tile
  seg_chunks: int       # chunks per (full) segment

  @property
  def num_chunks(self) -> int:
    return self.padded_length // self.bs.chunk

  @property
  def num_segments(self) -> int:
    return -(-self.num_chunks // self.seg_chunks)

  @property
  def segment_length(self) -> int:
    return self.seg_chunks * self.bs.chunk

  @property
  def last_length(self) -> int:
    """Real tokens of the last segment."""
    return self.length - (self.num_segments - 1) * self.segment_length

  @property
  def grid(self):
    return (self.batch, self.padded_channels // self.bs.tile, self.num_segments)


def make_geometry(x_shape, poles_shape, bs: FastBlocks) -> Geometry:
  batch, length, channels = x_shape
  for name, val in (("chunk", bs.chunk), ("tile", bs.tile)):
    if val < 1 or val & (val - 1):
      raise ValueError(f"FastBlocks.{name}={val} must be a power of two")
  if bs.segment < bs.chunk:
    raise ValueError(f"FastBlocks.segment={bs.segment} must be >= chunk={bs.chunk}")
  tile = bs.tile
  while tile > 16 and tile // 2 >= channels:  # narrow tiles for tiny D: less padding
    tile //= 2
  bs = dataclasses.replace(bs, tile=tile)
  num_chunks = -(-length // bs.chunk)
  seg_chunks = min(bs.segment // bs.chunk, num_chunks)
  tiles = batch * -(-channels // tile)
  while seg_chunks > 8 and tiles * -(-num_chunks // seg_chunks) < bs.min_programs:
    seg_chunks = max(8, seg_chunks // 2)
  return Geometry(bs, batch, length, channels, poles_shape[1], num_chunks * bs.chunk,
                  -(-channels // tile) * tile, seg_chunks)


def pad_params(geo: Geometry, log_poles, residues, dskip):
  """lambda, R as [N, Dp] float32 rows (padded channels: lambda = -1, R = 0, inert); dskip
  [Dp] float32 (zeros when None)."""
  pd = geo.padded_channels - geo.channels
  lam = jnp.pad(log_poles.astype(F32).T, ((0, 0), (0, pd)), constant_values=-1.0)
  res = jnp.pad(residues.astype(F32).T, ((0, 0), (0, pd)))
  skip = (jnp.zeros((geo.padded_channels,), F32) if dskip is None else
          jnp.pad(dskip.astype(F32), (0, pd)))
  return lam, res, skip


def pad_state(geo: Geometry, state):
  """[B, D, N] (or None = zeros) -> [B, N, Dp] float32 rows."""
  if state is None:
    return jnp.zeros((geo.batch, geo.states, geo.padded_channels), F32)
  return jnp.pad(jnp.swapaxes(state.astype(F32), 1, 2),
                 ((0, 0), (0, 0), (0, geo.padded_channels - geo.channels)))


def unpad_state(geo: Geometry, rows):
  """[..., N, Dp] rows -> [..., D, N]."""
  return jnp.swapaxes(rows[..., :geo.channels], -1, -2)


# ----------------------------------------------------------------------------- in-kernel pieces


def ids(geo: Geometry):
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  return b, pl.ds(pl.multiple_of(ti * geo.bs.tile, geo.bs.tile), geo.bs.tile), si


def load_rows(ref, idx, n: int):
  """The N rows ``ref[idx + (k, cols)]`` (idx ends before the state axis) as float32 [tile]."""
  *head, cols = idx
  return tuple(ref[tuple(head) + (k, cols)].astype(F32) for k in range(n))


def store_rows(ref, idx, rows):
  *head, cols = idx
  for k, r in enumerate(rows):
    ref[tuple(head) + (k, cols)] = r.astype(ref.dtype)


def decays(lam_ref, cols, n: int):
  return tuple(jnp.exp(r) for r in load_rows(lam_ref, (cols,), n))


def keep(masked: bool, ok, new, old):
  """new where token t is real (``ok`` = t < L), else old; a no-op for unmasked chunks."""
  if not masked:
    return new
  return tuple(jnp.where(ok, a, b) for a, b in zip(new, old))


def walk(geo: Geometry, si, load, step, carry, reverse: bool = False, full: bool = False,
         split_last: bool = False):
  """carry = step(k, carry, load(k), masked) over the chunks k of segment si, forward or in
  reverse. The last segment may hold fewer chunks (a dynamic trip count) and the sequence's last
  chunk is masked (``masked``: its tokens t >= L must leave the state alone) when L is not a
  multiple of chunk; ``full`` says the segment is known to be full and unmasked (first passes);
  ``split_last`` (forward only) always steps the segment's last chunk outside the loop, with
  ``masked``, so that step may return more than the carry (the last token's values).
  With ``prefetch`` each iteration issues the next chunk's loads before this chunk's math."""
  sc = geo.seg_chunks
  first = si * sc
  if full or geo.num_chunks % sc == 0:
    count = sc
  else:
    count = jnp.minimum(sc, geo.num_chunks - first)
  tail = split_last or ((not full) and geo.padded_length != geo.length)
  last = first + count - 1
  if tail and reverse:
    carry = step(last, carry, load(last), True)
  n = count - 1 if tail else count
  if reverse:
    order = (lambda j: last - 1 - j) if tail else (lambda j: last - j)
  else:
    order = lambda j: first + j
  clamp = lambda k: jnp.clip(k, 0, geo.num_chunks - 1)
  if geo.bs.prefetch:
    def body(j, state):
      cr, cur = state
      nxt = load(clamp(order(j + 1)))
      return step(order(j), cr, cur, False), nxt
    carry, cur = jax.lax.fori_loop(0, n, body, (carry, load(clamp(order(0)))))
  else:
    carry = jax.lax.fori_loop(0, n, lambda j, cr: step(order(j), cr, load(order(j)), False),
                              carry)
    cur = None
  if tail and not reverse:
    carry = step(last, carry, load(last) if cur is None else cur, True)
  return carry


def token_rows(geo: Geometry, refs, b, cols):
  """load(k) for ``walk``: the c tokens of chunk k, each a tuple of the refs' [tile] rows."""
  c = geo.bs.chunk

  def load(k):
    return tuple(tuple(r[b, k * c + i, cols] for r in refs) for i in range(c))
  return load


# ----------------------------------------------------------------------------- segment scan

SCAN_BLOCK = 256   # state elements per program of the segment scan
SCAN_GROUP = 16    # segments whose loads are issued together (latency of one round trip each)


def _scan_fwd_kernel(dec_ref, s0_ref, e_ref, *rest, num: int, seg_len: float, with_p: bool):
  """s_in[0] = s0, s_in[k+1] = A s_in[k] + e[k] (A = a^Ls); with_p, for m = p + s with
  p = ds/dlambda: m_in[0] = s0, m_in[k+1] = A (m_in[k] + Ls s_in[k]) + em[k] (from
  p_in[k+1] = A (p_in[k] + Ls s_in[k]) + ep[k]; no difference of the two is ever formed).
  A loop over groups of SCAN_GROUP segments whose loads are issued together."""
  if with_p:
    em_ref, sin_ref, min_ref = rest
  else:
    sin_ref, = rest
  b, j = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(pl.multiple_of(j * SCAN_BLOCK, SCAN_BLOCK), SCAN_BLOCK)
  dec = dec_ref[cols]

  def group(gi, carry):
    s, m = carry
    ks = [gi * SCAN_GROUP + i for i in range(SCAN_GROUP)]
    es = [e_ref[b, jnp.minimum(k, num - 2), cols] for k in ks]
    ems = [em_ref[b, jnp.minimum(k, num - 2), cols] if with_p else None for k in ks]
    for k, e, em in zip(ks, es, ems):
      @pl.when(k < num)
      def _():
        sin_ref[b, k, cols] = s
        if with_p:
          min_ref[b, k, cols] = m
      upd = k < num - 1
      s, m = (jnp.where(upd, dec * s + e, s),
              jnp.where(upd, dec * (m + seg_len * s) + em, m) if with_p else m)
    return s, m

  s0 = s0_ref[b, cols]
  jax.lax.fori_loop(0, -(-num // SCAN_GROUP), group, (s0, s0))


def _scan_bwd_kernel(dec_ref, dec_last_ref, wT_ref, ew_ref, win_ref, *, num: int):
  """w_in[S-1] = w_T, w_in[k] = A_{k+1} w_in[k+1] + ew_{k+1} (A_{S-1} = a^(last length));
  ew_ref[k] holds segment k + 1's ew. Groups of SCAN_GROUP segments, as the forward scan."""
  b, j = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(pl.multiple_of(j * SCAN_BLOCK, SCAN_BLOCK), SCAN_BLOCK)
  dec, dec_last = dec_ref[cols], dec_last_ref[cols]

  def group(gi, w):
    ks = [num - 1 - (gi * SCAN_GROUP + i) for i in range(SCAN_GROUP)]
    ews = [ew_ref[b, jnp.clip(k, 0, num - 2), cols] for k in ks]
    for k, ew in zip(ks, ews):
      upd = (k >= 0) & (k < num - 1)
      w = jnp.where(upd, jnp.where(k + 1 == num - 1, dec_last, dec) * w + ew, w)

      @pl.when(k >= 0)
      def _():
        win_ref[b, k, cols] = w
    return w

  jax.lax.fori_loop(0, -(-num // SCAN_GROUP), group, wT_ref[b, cols])


def _flat(geo, x):
  """[B, S, N, Dp] -> [B, S, M] with M = N * Dp padded to the scan block."""
  m = x.shape[-2] * x.shape[-1]
  x = x.reshape(x.shape[:-2] + (m,))
  pad = -m % SCAN_BLOCK
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _unflat(geo, x):
  m = geo.states * geo.padded_channels
  return x[..., :m].reshape(x.shape[:-1] + (geo.states, geo.padded_channels))


def scan_segments(geo: Geometry, lam, s0, ends, dends, interpret, poison):
  """Incoming (s_in[, m_in]) [B, S, N, Dp] of every segment from s0 [B, N, Dp] and the
  from-zero end states of segments 0..S-2 (``ends``, and ``dends`` = their m = ds/dlambda + s,
  or None)."""
  num = geo.num_segments
  dec = _flat(geo, jnp.exp(lam * float(geo.segment_length))[None, None])[0, 0]
  args = [dec, _flat(geo, s0[:, None])[:, 0], _flat(geo, ends)]
  with_p = dends is not None
  if with_p:
    args.append(_flat(geo, dends))
  m = dec.shape[0]
  out = jax.ShapeDtypeStruct((geo.batch, num, m), F32)
  kernel = functools.partial(_scan_fwd_kernel, num=num, seg_len=float(geo.segment_length),
                             with_p=with_p)
  outs = call_pallas(kernel, (out, out) if with_p else (out,), (geo.batch, m // SCAN_BLOCK),
                     FastBlocks(num_warps=4), interpret, "modal_fast_scan", poison, *args)
  return tuple(_unflat(geo, o) for o in outs)


def scan_adjoint(geo: Geometry, lam, w_T, ew, interpret, poison):
  """W entering every segment from its end, [B, S, N, Dp], from the final-state cotangent w_T
  [B, N, Dp] and the own from-zero adjoint start states ``ew`` [B, S-1, N, Dp] of segments
  1..S-1."""
  num = geo.num_segments
  dec = _flat(geo, jnp.exp(lam * float(geo.segment_length))[None, None])[0, 0]
  dec_last = _flat(geo, jnp.exp(lam * float(geo.last_length))[None, None])[0, 0]
  m = dec.shape[0]
  out = jax.ShapeDtypeStruct((geo.batch, num, m), F32)
  (w_in,) = call_pallas(functools.partial(_scan_bwd_kernel, num=num), (out,),
                        (geo.batch, m // SCAN_BLOCK), FastBlocks(num_warps=4), interpret,
                        "modal_fast_scan_adjoint", poison, dec, dec_last,
                        _flat(geo, w_T[:, None])[:, 0], _flat(geo, ew))
  return _unflat(geo, w_in)
