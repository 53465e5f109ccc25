"""LI by a point-to-point distributed FFT (the paper's p2p scheme; no public code ships it).

The LI convolution is ``y = IFFT_M(FFT_M([u, 0]) * FFT_M([h, 0]))[:L]`` with M = 2L. Instead of
moving channels (all-to-all), every rank keeps all D channels and the FFT itself is distributed
by decimation in frequency (DIF), radix 2 across ranks, with ``lax.ppermute`` between partners:

  stage 0 (local)    the zero half of [u, 0] makes the first radix-2 step free: even
                     frequencies are DFT_L(u), odd ones DFT_L(u * W_M^n).
  stage 1 (mirror)   length-L DIF step pairing chunk j with chunk j+N. Under zig-zag rank r
                     holds chunks r and 2N-1-r and rank N-1-r holds chunk N+r, so one chunk of
                     real u crosses between mirror ranks; after it every sub-sequence is in
                     contiguous blocks of c = L/(2N) tokens, block r on rank r.
  stages 2.. (cube)  log2 N hypercube DIF steps, partner r XOR half, whole local data each.
  local FFT          size c per sub-sequence; rank r now holds the frequencies
                     k = o + 4 * bitrev(r) + 4N q, o in (0, 2, 1, 3), q < c — the DIF's
                     bit-reversed order, never undone.
  product            times the LI filter's spectrum at exactly those frequencies, computed
                     locally from the modal form folded to c taps and one FFT of size c
                     (``decimated_modal_spectrum``: no [D, L] filter, no communication).
  inverse            the transposed steps in reverse order (decimation in time, conjugate
                     twiddles, halving): it consumes the bit-reversed order and returns natural
                     order, so the two permutations cancel. The mirror step sends back one real
                     chunk.

Traffic per rank and direction: c reals + 4c complex per cube step, against (N-1)/N * 2c reals
for the all-to-all (per channel); the FFT work per rank is the same 1/N of the total. N must be
a power of two.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sh2_jax.ops import fir
from sh2_jax.parallel.zigzag import merge_chunks, split_chunks

OFFSETS = np.array([0, 2, 1, 3])  # frequency offsets of the four sub-sequences (e_s, e_d, o_s, o_d)


def _phase(num: jax.Array, den: int) -> jax.Array:
  """W_den^num = exp(-2 pi i num / den), complex64, with num reduced mod den first (accuracy)."""
  ang = (-2.0 * np.pi / den) * jnp.mod(num, den).astype(jnp.float32)
  return jax.lax.complex(jnp.cos(ang), jnp.sin(ang))


@jax.checkpoint
def _folded_mode(lam, res, wrap, p):
  """One mode's contribution R * S_f * exp(lambda p) to the folded filter: [F, c, D] complex64.
  lam, res: [D]; wrap: [F, D] complex (S_f / R); p: [c]."""
  decay = jnp.exp(lam[None, :] * p[:, None].astype(jnp.float32))  # [c, D]
  return (res[None, :] * wrap)[:, None, :] * decay[None]


def decimated_modal_spectrum(log_poles: jax.Array, residues: jax.Array, offsets: jax.Array,
                             chunk: int, length: int) -> jax.Array:
  """DFT_{2L} of the zero-padded LI filter (``modal.modal_filter``) at the frequencies
  ``offsets[f] + (2L / chunk) * q``, q < chunk: [F, chunk, D] complex64.

  With M = 2L = s * chunk, k = f + s q and t = p + j * chunk:
  H[k] = FFT_chunk(g_f)[q],  g_f[p] = W_M^{f p} sum_j h[p + j chunk] W_M^{f j chunk},
  and for h[t] = sum_n R_n a_n^t the fold over j is a short geometric sum per mode
  (S_{n,f} = sum_j (a_n^chunk W_M^{f chunk})^j, L / chunk terms). So each rank transforms only
  its own frequencies, from a [chunk]-long folded filter — never the [D, L] filter — with the
  same accuracy as the FFT of the filter (a closed form 1/(1 - a W^k) loses digits in the
  gradient of slow poles).
  """
  m = 2 * length
  folds = length // chunk
  lam = log_poles.astype(jnp.float32)  # [D, S]
  res = residues.astype(jnp.float32)
  p = jnp.arange(chunk)
  j = jnp.arange(folds)
  # S[f, n, d] = sum_j exp(j chunk lambda) W_M^{f j chunk}
  phase = _phase(offsets[:, None] * chunk * j[None, :], m)  # [F, J]
  growth = jnp.exp(lam[None] * (chunk * j.astype(jnp.float32))[:, None, None])  # [J, D, S]
  wrap = jnp.einsum("fj,jds->fds", phase, growth.astype(jnp.complex64))  # [F, D, S]
  g = jnp.zeros((offsets.shape[0], chunk, lam.shape[0]), jnp.complex64)
  for mode in range(lam.shape[1]):
    g = g + _folded_mode(lam[:, mode], res[:, mode], wrap[:, :, mode], p)
  g = g * _phase(offsets[:, None] * p[None, :], m)[..., None]
  return jnp.fft.fft(g, axis=1)


def _bitrev(r: jax.Array, bits: int) -> jax.Array:
  out = jnp.zeros_like(r)
  for i in range(bits):
    out = out | (((r >> i) & 1) << (bits - 1 - i))
  return out


def p2p_modal_conv(u: jax.Array, log_poles: jax.Array, residues: jax.Array, axis_name: str,
                   n: int) -> jax.Array:
  """Causal LI convolution of the zig-zag shard u: [B, 2c, D] (real) with the modal filter of
  poles/residues [D, S], over the whole sequence L = 2cN. Returns [B, 2c, D] in u's dtype."""
  if n & (n - 1):
    raise ValueError(f"the p2p FFT needs a power-of-two context size, not {n}; use li_mode 'a2a'")
  b, l2, d = u.shape
  c = l2 // 2
  length, m = 2 * n * c, 4 * n * c
  r = jax.lax.axis_index(axis_name)
  p = jnp.arange(c)
  pos_a, pos_b = r * c + p, (n + r) * c + p  # chunk r (local) and its DIF partner chunk N+r
  mirror = [(i, n - 1 - i) for i in range(n)]
  uc = split_chunks(u.astype(jnp.float32))
  ua, ub = uc[:, 0], jax.lax.ppermute(uc[:, 1], axis_name, mirror)
  col = lambda t: t[None, :, None]
  tw_a, tw_b, wl = col(_phase(pos_a, m)), col(_phase(pos_b, m)), col(_phase(pos_a, length))
  oa, ob = ua * tw_a, ub * tw_b
  x = jnp.stack([ua + ub, (ua - ub) * wl, oa + ob, (oa - ob) * wl], axis=1)  # [B, 4, c, D]
  x = x.astype(jnp.complex64)
  half = n // 2
  while half >= 1:  # hypercube DIF steps
    other = jax.lax.ppermute(x, axis_name, [(i, i ^ half) for i in range(n)])
    g = r % (2 * half)
    lower = g < half
    lo, hi = jnp.where(lower, x, other), jnp.where(lower, other, x)
    tw = _phase((g - half) * c + p, 2 * half * c)[None, None, :, None]
    x = jnp.where(lower, lo + hi, (lo - hi) * tw)
    half //= 2
  spectrum = jnp.fft.fft(x, axis=2)
  offsets = jnp.asarray(OFFSETS) + 4 * _bitrev(r, int(math.log2(n)))  # k = offset + 4N q
  hspec = decimated_modal_spectrum(log_poles, residues, offsets, c, length)  # [4, c, D]
  y = jnp.fft.ifft(spectrum * hspec[None], axis=2)
  half = 1
  while half < n:  # inverse hypercube steps (decimation in time), reverse order
    other = jax.lax.ppermute(y, axis_name, [(i, i ^ half) for i in range(n)])
    g = r % (2 * half)
    lower = g < half
    s, dd = jnp.where(lower, y, other), jnp.where(lower, other, y)
    dd = dd * jnp.conj(_phase((g % half) * c + p, 2 * half * c))[None, None, :, None]
    y = jnp.where(lower, s + dd, s - dd) * 0.5
    half *= 2
  wlc = jnp.conj(wl)
  ze_a, ze_b = (y[:, 0] + y[:, 1] * wlc) * 0.5, (y[:, 0] - y[:, 1] * wlc) * 0.5
  zo_a, zo_b = (y[:, 2] + y[:, 3] * wlc) * 0.5, (y[:, 2] - y[:, 3] * wlc) * 0.5
  out_a = jnp.real(ze_a + jnp.conj(tw_a) * zo_a) * 0.5
  out_b = jnp.real(ze_b + jnp.conj(tw_b) * zo_b) * 0.5  # chunk N+r, owned by rank N-1-r
  out_b = jax.lax.ppermute(out_b, axis_name, mirror)
  return merge_chunks(jnp.stack([out_a, out_b], axis=1)).astype(u.dtype)


def p2p_gated_modal(x1, v, x2, log_poles, residues, dskip, axis_name: str, n: int):
  """LI by the p2p FFT: ``x2 * (h_modal * u + dskip * u)``, u = x1 * v; all [B, 2c, D] zig-zag."""
  return fir.gated_conv(
      x1, v, x2, lambda u: p2p_modal_conv(u, log_poles, residues, axis_name, n), dskip)
