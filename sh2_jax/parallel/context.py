"""The StripedHyena 2 forward pass on a context-parallel mesh.

``ContextParallel`` is the one place where the context-parallel configuration meets the
operators: it names the mesh axis, its size N, and the collective used per operator:

  featurizer, SE     p2p halo exchange (``halo.py``)           always
  MR                 ``mr_mode``: ``p2p`` (halo) | ``a2a`` (all-to-all, ``a2a.py``)
  LI                 ``li_mode``: ``a2a`` | ``p2p_fft`` (distributed FFT, ``p2p_fft.py``) |
                     ``state`` (all-gather of the modal states, ``li_state_passing.py``)
  MHA                ``attention_mode``: ``allgather`` | ``ring`` (``attention.py``)

``forward_local`` walks ``model.blocks`` inside ``shard_map`` and calls the blocks' own pieces
(``pre_norm``, ``projections``, ``filter.featurizer_taps()`` / ``fir_taps()`` / ``log_poles()``,
``out_filter_dense``, ``inner_mha_cls.qkv``, ``out_proj``, ``mlp``) with the context-parallel
convolutions, so the parameters and the per-token math are the model's own; RoPE gets the global
(zig-zag) positions. ``context_parallel_logits`` is the global-array entry point: tokens [B, L]
in, logits [B, L, V] (global order) out, differentiable with respect to the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sh2_jax import conv, dispatch
from sh2_jax.parallel import a2a, halo, li_state_passing, p2p_fft
from sh2_jax.parallel.attention import ATTENTION_MODES, cp_attention
from sh2_jax.parallel.zigzag import chunk_length, local_positions, zigzag_shard, zigzag_unshard

MR_MODES = ("p2p", "a2a")
LI_MODES = ("a2a", "p2p_fft", "state")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """How the model runs over the ``axis_name`` mesh axis of ``size`` ranks."""

  size: int
  axis_name: str = "context"
  mr_mode: str = "p2p"
  li_mode: str = "a2a"
  attention_mode: str = "allgather"
  remat: bool = False  # recompute each block in the backward pass (long sequences)

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"context size {self.size!r} must be a positive integer")
    for name, value, valid in (("mr_mode", self.mr_mode, MR_MODES),
                               ("li_mode", self.li_mode, LI_MODES),
                               ("attention_mode", self.attention_mode, tuple(ATTENTION_MODES))):
      if value not in valid:
        raise ValueError(f"context {name} {value!r} is not one of {', '.join(valid)}")


def hyena_mix(block, x: jax.Array, cp: ContextParallel) -> jax.Array:
  """The Hyena operator of a HyenaBlock on the zig-zag shard x: [B, 2c, D]."""
  filt, ax, n = block.filter, cp.axis_name, cp.size
  z = block.projections(x)
  x2, x1, v = conv.interleaved_split(halo.halo_featurizer(z, filt.featurizer_taps(), ax, n))
  dskip = None if filt.D is None else filt.D[...]
  if filt.op == "LI":
    if cp.li_mode == "a2a":
      y = a2a.a2a_gated_modal(x1, v, x2, filt.log_poles(), filt.residues[...], dskip,
                              filt.cfg.li_impl, ax, n)
    elif cp.li_mode == "state":
      y = li_state_passing.state_passing_gated_modal(
          x1, v, x2, filt.log_poles(), filt.residues[...], dskip, ax, n,
          impl=dispatch.resolve_li_impl(filt.cfg.li_impl))
    else:
      y = p2p_fft.p2p_gated_modal(x1, v, x2, filt.log_poles(), filt.residues[...], dskip, ax, n)
  elif filt.op == "MR" and cp.mr_mode == "a2a":
    y = a2a.a2a_gated_fir(x1, v, x2, filt.fir_taps(), dskip, filt.cfg.conv_impl, ax, n)
  else:
    y = halo.halo_gated_fir(x1, v, x2, filt.fir_taps(), dskip, filt.cfg.conv_impl, ax, n)
  return block.out_filter_dense(y)


def attention_mix(block, x: jax.Array, positions: jax.Array, cp: ContextParallel) -> jax.Array:
  """The MHA of an AttentionBlock on the zig-zag shard x: [B, 2c, D]; positions: [2c] global."""
  att = block.inner_mha_cls
  q, k, v = att.qkv(x, positions)
  o = cp_attention(q, k, v, cp.axis_name, cp.size, att.head_dim ** -0.5, att.impl,
                   cp.attention_mode, att.dtype)
  return att.out_proj(o.reshape(x.shape))


def block_forward(block, u: jax.Array, positions: jax.Array, cp: ContextParallel) -> jax.Array:
  """``z = u + mix(pre_norm(u))``, ``y = z + mlp(post_norm(z))`` (as ``model.residual_block``)."""
  x = block.pre_norm(u)
  mix = attention_mix(block, x, positions, cp) if block.op == "MHA" else hyena_mix(block, x, cp)
  z = u + mix
  return z + block.mlp(block.post_norm(z))


def forward_local(model, tokens: jax.Array, cp: ContextParallel) -> jax.Array:
  """Inside shard_map: this rank's zig-zag tokens [B, 2c] -> its logits [B, 2c, V] (float32)."""
  model.check_tokens(tokens)
  positions = local_positions(tokens.shape[1], cp.size, cp.axis_name)
  x = model.embedding_layer(tokens)
  for block in model.blocks:
    if cp.remat:
      graphdef, state = nnx.split(block)
      step = jax.checkpoint(lambda s, x_, g=graphdef: block_forward(nnx.merge(g, s), x_,
                                                                   positions, cp))
      x = step(state, x)
    else:
      x = block_forward(block, x, positions, cp)
  return model.embedding_layer.unembed(model.norm(x))


def context_parallel_logits(model, tokens: jax.Array, mesh, cp: ContextParallel,
                            batch_axes=None, zigzag_output: bool = False) -> jax.Array:
  """tokens [B, L] (global order) -> logits [B, L, V] computed on the context-parallel mesh.

  The batch is split over ``batch_axes`` (a mesh axis name or tuple, or None), the sequence
  zig-zag over ``cp.axis_name``; the parameters enter replicated. With ``zigzag_output`` the
  logits stay in zig-zag order (permute the targets with ``zigzag_shard`` instead: cheaper
  than moving [B, L, V] logits back).
  """
  if mesh.shape[cp.axis_name] != cp.size:
    raise ValueError(f"context size {cp.size} does not match mesh axis {cp.axis_name!r} of "
                     f"size {mesh.shape[cp.axis_name]}")
  chunk_length(tokens.shape[1], cp.size)  # clear error for a length that cannot be split
  graphdef, state = nnx.split(model)
  spec = P(batch_axes, cp.axis_name)

  def local(state, tok):
    return forward_local(nnx.merge(graphdef, state), tok, cp)

  # check_vma=False: the Pallas kernels' outputs carry no mesh-varying annotation; the tests
  # check the gradients of the replicated parameters under exactly this setting.
  logits = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec),
                         out_specs=P(batch_axes, cp.axis_name, None), check_vma=False)(
                             state, zigzag_shard(tokens, cp.size))
  return logits if zigzag_output else zigzag_unshard(logits, cp.size)
