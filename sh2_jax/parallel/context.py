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

Parameters enter ``shard_map`` FSDP-sharded as the model annotates them (``fsdp`` on the first
axis of matrices -> the mesh axes ``FSDP_AXES`` present in the mesh) and each block gathers its
own parameters when it runs (inside its rematerialised step, so the backward gathers them again
and the gradients leave reduce-scattered): one block's full parameters are live at a time, not
the whole model's (ZeRO-3; at the 7B width on 4 GPUs the whole model gathered in float32 took
26 GB per device before its gradients).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sh2_jax import conv, dispatch
from sh2_jax.parallel import a2a, halo, li_state_passing, p2p_fft
from sh2_jax.parallel.attention import ATTENTION_MODES, cp_attention
from sh2_jax.parallel.zigzag import chunk_length, local_positions, zigzag_shard, zigzag_unshard
from sh2_jax.train.mesh import FSDP_AXES, axis_size, fsdp_spec

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


def is_spec(x) -> bool:
  return isinstance(x, P)


def fsdp_specs(state, mesh) -> nnx.State:
  """PartitionSpecs of a module state from its annotations: 'fsdp' -> the FSDP_AXES of
  ``mesh``. A leaf whose annotated dimension their size does not divide enters whole (the
  trainer rejects such a model before this, mesh.param_shardings; here it only costs memory)."""
  axes = tuple(a for a in FSDP_AXES if a in mesh.axis_names)
  size = axis_size(mesh, axes)

  def one(spec, x):
    ok = all(d % size == 0 for d, a in zip(x.shape, spec) if a == "fsdp")
    return fsdp_spec(spec, axes if ok else ())
  return jax.tree.map(one, nnx.get_partition_spec(state), state, is_leaf=is_spec)


def gather_params(state, specs):
  """Inside shard_map: all-gather every leaf over the mesh axes its spec shards it on."""
  def one(spec, x):
    for dim, axes in enumerate(spec):
      if axes is not None:
        x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
    return x
  return jax.tree.map(one, specs, state, is_leaf=is_spec)


def forward_local(model, tokens: jax.Array, cp: ContextParallel, specs=None) -> jax.Array:
  """Inside shard_map: this rank's zig-zag tokens [B, 2c] -> its logits [B, 2c, V] (float32).
  With ``specs`` (``fsdp_specs`` of the whole model's state) ``model`` holds this rank's shards
  of the parameters and each block gathers its own when it runs; without, ``model`` is whole."""
  model.check_tokens(tokens)
  positions = local_positions(tokens.shape[1], cp.size, cp.axis_name)

  def whole(module, spec):
    if spec is None:
      return module
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, gather_params(state, spec))

  embedding = whole(model.embedding_layer, None if specs is None else specs["embedding_layer"])
  norm = whole(model.norm, None if specs is None else specs["norm"])
  x = embedding(tokens)
  for i, block in enumerate(model.blocks):
    graphdef, state = nnx.split(block)
    spec = None if specs is None else specs["blocks"][i]
    step = (lambda s, x_, g=graphdef, sp=spec: block_forward(
        nnx.merge(g, s if sp is None else gather_params(s, sp)), x_, positions, cp))
    x = (jax.checkpoint(step) if cp.remat else step)(state, x)
  return embedding.unembed(norm(x))


def context_parallel_logits(model, tokens: jax.Array, mesh, cp: ContextParallel,
                            batch_axes=None, zigzag_output: bool = False) -> jax.Array:
  """tokens [B, L] (global order) -> logits [B, L, V] computed on the context-parallel mesh.

  The batch is split over ``batch_axes`` (a mesh axis name or tuple, or None), the sequence
  zig-zag over ``cp.axis_name``; the parameters enter FSDP-sharded (module docstring). With
  ``zigzag_output`` the logits stay in zig-zag order (permute the targets with ``zigzag_shard``
  instead: cheaper than moving [B, L, V] logits back).
  """
  if mesh.shape[cp.axis_name] != cp.size:
    raise ValueError(f"context size {cp.size} does not match mesh axis {cp.axis_name!r} of "
                     f"size {mesh.shape[cp.axis_name]}")
  chunk_length(tokens.shape[1], cp.size)  # clear error for a length that cannot be split
  graphdef, state = nnx.split(model)
  spec = P(batch_axes, cp.axis_name)
  state_specs = fsdp_specs(state, mesh)
  state = jax.tree.map(
      lambda sp, x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, sp)),
      state_specs, state, is_leaf=is_spec)

  def local(state, tok):
    return forward_local(nnx.merge(graphdef, state), tok, cp, state_specs)

  # check_vma=False: the Pallas kernels' outputs carry no mesh-varying annotation; the tests
  # check the gradients of the replicated parameters under exactly this setting.
  logits = jax.shard_map(local, mesh=mesh, in_specs=(state_specs, spec),
                         out_specs=P(batch_axes, cp.axis_name, None), check_vma=False)(
                             state, zigzag_shard(tokens, cp.size))
  return logits if zigzag_output else zigzag_unshard(logits, cp.size)
