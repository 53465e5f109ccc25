"""The Hyena operator's filters (SE, MR, LI share everything but the inner filter).

x: [B, L, D] -> [B, L, D] (``HyenaBlock.mix`` in ``blocks.py``):
  z = projections(x)                  [B, L, 3D], no bias
  zc = featurizer(z)                  depthwise causal 3-tap FIR (checkpoint: cross-correlation)
  x2, x1, v = zc[..., 0::3], zc[..., 1::3], zc[..., 2::3]
  y = x2 * (inner(x1 * v) [+ D * x1 * v])        <- the filter module, ``filter(z) -> y``
  out = out_filter_dense(y)           D -> D with bias

Two filter classes: ``FirFilter`` (SE, MR: a grouped FIR) and ``ModalFilter`` (LI: the modal
long filter). Both own the featurizer weights (module path ``filter``, as in the checkpoint),
run in every mode of ``sh2_jax.modes`` through one call ``filter(z, mode, cache) ->
(y, cache)``, and own their cache's shape (``init_cache``). The math is ``sh2_jax.ops``; the
implementation (XLA, FFT, Pallas) comes from ``dispatch`` as a callable.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import capture, dispatch
from sh2_jax.config import ModelConfig
from sh2_jax.layers import param
from sh2_jax.modes import (FULL, ContextParallel, Decode, HyenaCache, Prefill, Segment,
                           from_ring, last_steps, right_align, ring_write, to_ring, with_history)
from sh2_jax.ops import fir, modal
from sh2_jax.parallel import a2a, halo, li_state_passing, p2p_fft


class _HyenaFilter(nnx.Module):
  """What SE, MR and LI filters share: the featurizer ``short_filter_weight`` [3D, 3]
  (cross-correlation: last tap = current token), the gate, and the per-mode featurizer."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, pdt = cfg.d_model, jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    k = cfg.featurizer_len
    self.short_filter_weight = param(
        rngs, jax.nn.initializers.uniform(2 / math.sqrt(k)), (3 * d, k), pdt, ("fsdp", None))
    self.short_filter_weight[...] = self.short_filter_weight[...] - 1 / math.sqrt(k)

  def featurizer_taps(self) -> jax.Array:
    """[3D, 3] in true-convolution orientation, h[:, 0] = current token."""
    return jnp.flip(self.short_filter_weight[...], axis=1)

  def dskip(self) -> jax.Array | None:
    return None if self.D is None else self.D[...]

  def _featurize(self, z, mode, cache):
    """z [B, L, 3D] -> ((x2, x1, v) each [B, L, D], the featurizer history for the cache)."""
    taps = self.featurizer_taps()
    k = self.cfg.featurizer_len
    hist = None
    if isinstance(mode, Decode):
      hist = ring_write(cache.z_hist, mode.positions, z[:, 0])  # [B, k, 3D], in place
      zc = fir.fir_step(from_ring(hist, mode.positions + 1), taps)[:, None]
    elif isinstance(mode, Segment):
      ext = with_history(from_ring(cache.z_hist, mode.offset)[:, 1:], z)
      zc = fir.featurizer_conv(ext, taps)[:, k - 1:]
      hist = to_ring(ext[:, -k:], mode.offset + z.shape[1])
    elif isinstance(mode, ContextParallel):
      zc = halo.halo_featurizer(z, taps, mode.axis_name, mode.size)
    else:
      if isinstance(mode, Prefill):
        hist = to_ring(last_steps(z, mode.lengths, k), mode.lengths)
      return fir.featurize(z, taps), hist
    return fir.interleaved_split(zc), hist

  def __call__(self, z: jax.Array, mode=FULL, cache: HyenaCache | None = None):
    """z = projections(x) [B, L, 3D] -> (y [B, L, D], the new HyenaCache or None)."""
    (x2, x1, v), hist = self._featurize(z, mode, cache)
    y, state = self._inner(x1, v, x2, mode, None if cache is None else cache.state)
    new = None if cache is None else HyenaCache(hist, state.astype(cache.state.dtype))
    return capture.record(self, y), new

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: the featurizer (2 x 3 taps x 3D) plus the inner filter."""
    return 2 * self.cfg.featurizer_len * 3 * self.cfg.d_model + self._inner_flops(seq_len)

  def init_cache(self, batch: int, max_len: int) -> HyenaCache:
    """The empty cache of this layer (history before position 0 is zeros)."""
    del max_len
    d, dt = self.cfg.d_model, jnp.dtype(self.cfg.dtype)
    return HyenaCache(jnp.zeros((batch, self.cfg.featurizer_len, 3 * d), dt),
                      self._init_state(batch))


class FirFilter(_HyenaFilter):
  """SE or MR: a grouped causal FIR ``h`` [G, K] (G groups of D/G contiguous channels).

  SE (``FirFilter.se``): length 7, stored as a cross-correlation (h[:, -1] = current token), no
  skip. MR (``FirFilter.mr``): length 128, true convolution, skip ``D`` [D], and during training
  times the regularising decay. ``context_all_to_all``: may run by all-to-all under context
  parallelism (``ContextParallel.mr_mode``); otherwise by halo exchange.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, taps: int, groups: int,
               cross_correlation: bool, skip: bool, decay: bool, context_all_to_all: bool):
    super().__init__(cfg, rngs)
    pdt = jnp.dtype(cfg.param_dtype)
    self.h = param(rngs, jax.nn.initializers.normal(1 / math.sqrt(taps)), (groups, taps), pdt,
                   (None, None))
    self.D = param(rngs, jax.nn.initializers.ones, (cfg.d_model,), pdt, (None,)) if skip else None
    self.taps = taps
    self.cross_correlation = cross_correlation
    self.decay = decay
    self.context_all_to_all = context_all_to_all

  @classmethod
  def se(cls, cfg: ModelConfig, rngs: nnx.Rngs) -> "FirFilter":
    return cls(cfg, rngs, taps=cfg.se_len, groups=cfg.se_groups, cross_correlation=True,
               skip=False, decay=False, context_all_to_all=False)

  @classmethod
  def mr(cls, cfg: ModelConfig, rngs: nnx.Rngs) -> "FirFilter":
    return cls(cfg, rngs, taps=cfg.mr_len, groups=cfg.mr_groups, cross_correlation=False,
               skip=True, decay=True, context_all_to_all=True)

  def fir_taps(self) -> jax.Array:
    """The grouped filter [G, K] in true-convolution orientation, h[:, 0] = current token."""
    h = self.h[...]
    if self.cross_correlation:
      h = jnp.flip(h, axis=1)
    if self.decay:
      groups, taps = h.shape
      h = h * fir.mr_decay(groups, taps, self.cfg.mr_decay, self.cfg.mr_decay_length or None)
    return h

  def _init_state(self, batch: int) -> jax.Array:
    return jnp.zeros((batch, self.taps, self.cfg.d_model), jnp.dtype(self.cfg.dtype))

  def _inner_flops(self, seq_len: int) -> float:
    return 2 * self.taps * self.cfg.d_model

  def _inner(self, x1, v, x2, mode, state):
    """The gated FIR core in ``mode``: (y [B, L, D], the last K inputs u as a ring for the
    cache)."""
    h, dskip = self.fir_taps(), self.dskip()
    core = dispatch.fir_fn(self.cfg.conv_impl)
    taps = h.shape[1]
    if isinstance(mode, Decode):
      # Write u into its slot first, then read the window from the written ring: the write is
      # the old ring's only use, so it happens in place (no shift, no copy of the window).
      ring = ring_write(state, mode.positions, (x1 * v)[:, 0])  # [B, K, D]
      window = from_ring(ring, mode.positions + 1)
      y = fir.gated_conv(x1, v, x2, lambda u: fir.fir_step(window, h)[:, None], dskip)
      return y, ring
    if isinstance(mode, Segment):
      # [u_hist; u] through the gate with x1 := [u_hist; x1], v := [1; v], x2 := [0; x2], so
      # the configured kernel runs unchanged; the history rows are dropped.
      hist = from_ring(state, mode.offset)[:, 1:]                # [B, K-1, D]
      ones, zeros = jnp.ones_like(hist, v.dtype), jnp.zeros_like(hist, x2.dtype)
      y = core(with_history(hist, x1), with_history(ones, v), with_history(zeros, x2), h,
               dskip)[:, taps - 1:]
      u = x1 * v
      return y, to_ring(with_history(hist, u)[:, -taps:], mode.offset + u.shape[1])
    if isinstance(mode, ContextParallel):
      if self.context_all_to_all and mode.mr_mode == "a2a":
        return a2a.a2a_gated_fir(x1, v, x2, h, dskip, core, mode.axis_name, mode.size), None
      return halo.halo_gated_fir(x1, v, x2, h, dskip, core, mode.axis_name, mode.size), None
    y = core(x1, v, x2, h, dskip)
    if isinstance(mode, Prefill):
      return y, to_ring(last_steps(x1 * v, mode.lengths, taps), mode.lengths)
    return y, None


class ModalFilter(_HyenaFilter):
  """LI: one modal long filter per channel, ``h[d, t] = sum_n R[d, n] exp(lambda[d, n] t)``,
  plus skip ``D`` [D]. Parameters ``log_rates`` [D, N] (poles lambda = -exp(log_rates)) and
  ``residues`` [D, N]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    super().__init__(cfg, rngs)
    d, n, pdt = cfg.d_model, cfg.li_state, jnp.dtype(cfg.param_dtype)
    rates = np.logspace(-4, 0, n, dtype=np.float32)  # timescales 1 .. 1e4 tokens
    self.log_rates = nnx.Param(jnp.tile(jnp.log(rates), (d, 1)).astype(pdt),
                               out_sharding=("fsdp", None), eager_sharding=False)
    r = jax.random.normal(rngs.params(), (d, n), jnp.float32) * jnp.sqrt(2 * rates) / 4
    self.residues = nnx.Param(r.astype(pdt), out_sharding=("fsdp", None), eager_sharding=False)
    self.D = param(rngs, jax.nn.initializers.ones, (d,), pdt, (None,))

  def log_poles(self) -> jax.Array:
    """LI poles lambda [D, N] (negative), float32."""
    return -jnp.exp(self.log_rates[...].astype(jnp.float32))

  def _init_state(self, batch: int) -> jax.Array:
    return jnp.zeros((batch, self.cfg.d_model, self.cfg.li_state), jnp.float32)

  def _inner_flops(self, seq_len: int) -> float:
    # The FFT convolution: three real FFTs of size 2L at ~5 N log2 N each, per token.
    return 30 * math.log2(2 * seq_len) * self.cfg.d_model

  def _inner(self, x1, v, x2, mode, state):
    """The gated LI core in ``mode``: (y [B, L, D], the modal state [B, D, N] for the cache)."""
    lam, res, dskip = self.log_poles(), self.residues[...], self.dskip()
    impl = self.cfg.li_impl
    if isinstance(mode, Decode):
      new = {}

      def step(u):
        y, new["state"] = modal.modal_step(state, u[:, 0], lam, res)
        return y[:, None]

      y = fir.gated_conv(x1, v, x2, step, dskip)
      return y, new["state"]
    if isinstance(mode, ContextParallel):
      ax, n = mode.axis_name, mode.size
      if mode.li_mode == "a2a":
        y = a2a.a2a_gated_modal(x1, v, x2, lam, res, dskip, dispatch.modal_fn(impl), ax, n)
      elif mode.li_mode == "state":
        y = li_state_passing.state_passing_gated_modal(
            x1, v, x2, lam, res, dskip, ax, n, dispatch.modal_with_state_fn(impl))
      else:
        y = p2p_fft.p2p_gated_modal(x1, v, x2, lam, res, dskip, ax, n)
      return y, None
    y = dispatch.modal_fn(impl)(x1, v, x2, lam, res, dskip)
    u = x1 * v
    if isinstance(mode, Segment):
      # The segment from a zero state plus the response of the carried state.
      y_state = modal.state_response(state, lam, res, u.shape[1])          # [B, S, D]
      y = (y.astype(jnp.float32) + x2.astype(jnp.float32) * y_state).astype(y.dtype)
      return y, modal.advance_state(state, u, lam)
    if isinstance(mode, Prefill):
      return y, modal.modal_state(right_align(u, mode.lengths), lam)
    return y, None
