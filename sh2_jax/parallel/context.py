"""The StripedHyena 2 forward pass on a context-parallel mesh: a driver of the one forward.

``ContextParallel`` (``sh2_jax.modes``) is the mode value: it names the mesh axis, its size N,
and the collective used per operator (each mixer runs it in that mode):

  featurizer, SE     p2p halo exchange (``halo.py``)           always
  MR                 ``mr_mode``: ``p2p`` (halo) | ``a2a`` (all-to-all, ``a2a.py``)
  LI                 ``li_mode``: ``a2a`` | ``p2p_fft`` (distributed FFT, ``p2p_fft.py``) |
                     ``state`` (all-gather of the modal states, ``li_state_passing.py``)
  MHA                ``attention_mode``: ``allgather`` | ``ring`` (``attention.py``)

RoPE gets the global (zig-zag) positions. ``context_parallel_logits`` is the global-array entry
point: tokens [B, L] in, logits [B, L, V] (global order) out, differentiable with respect to
the model; ``context_parallel_forward`` also returns named activations (``sh2_jax.embed``).

Parameters enter ``shard_map`` FSDP-sharded as the model annotates them (``fsdp`` on the first
axis of matrices -> the mesh axes ``sharding.FSDP_AXES`` present in the mesh) and each block
gathers its own parameters when it runs (the walk's ``param_specs``; inside its
rematerialised step, so the backward gathers them again and the gradients leave
reduce-scattered): one block's full parameters are live at a time, not the whole model's
(ZeRO-3; at the 7B width on 4 GPUs the whole model gathered in float32 took 26 GB per device
before its gradients).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sh2_jax import capture
from sh2_jax.modes import ContextParallel
from sh2_jax.parallel.zigzag import chunk_length, zigzag_shard, zigzag_unshard
from sh2_jax.sharding import fsdp_specs, is_spec

__all__ = ["ContextParallel", "context_parallel_forward", "context_parallel_logits",
           "forward_local"]


def forward_local(model, tokens: jax.Array, cp: ContextParallel, param_specs=None) -> jax.Array:
  """Inside shard_map: this rank's zig-zag tokens [B, 2c] -> its logits [B, 2c, V] (float32).
  With ``param_specs`` (``fsdp_specs`` of the model's Param state) ``model`` holds this rank's
  shards of the parameters and each block gathers its own when it runs."""
  return model.forward(tokens, cp, remat="blocks" if cp.remat else "none",
                       param_specs=param_specs)[0]


def context_parallel_forward(model, tokens: jax.Array, mesh, cp: ContextParallel,
                             batch_axes=None, zigzag_output: bool = False, layers=()):
  """tokens [B, L] (global order) -> (logits [B, L, V], {path: activations [B, L, ...]} for the
  module paths ``layers``) computed on the context-parallel mesh.

  The batch is split over ``batch_axes`` (a mesh axis name or tuple, or None), the sequence
  zig-zag over ``cp.axis_name``; the parameters enter FSDP-sharded (module docstring). With
  ``zigzag_output`` the outputs stay in zig-zag order (permute the targets with
  ``zigzag_shard`` instead: cheaper than moving [B, L, V] logits back).
  """
  if mesh.shape[cp.axis_name] != cp.size:
    raise ValueError(f"context size {cp.size} does not match mesh axis {cp.axis_name!r} of "
                     f"size {mesh.shape[cp.axis_name]}")
  chunk_length(tokens.shape[1], cp.size)  # clear error for a length that cannot be split
  layers = tuple(layers)
  graphdef, state = nnx.split(model)
  spec = P(batch_axes, cp.axis_name)
  state_specs = fsdp_specs(state, mesh)
  param_specs = fsdp_specs(nnx.state(model, nnx.Param), mesh)
  state = jax.tree.map(
      lambda sp, x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, sp)),
      state_specs, state, is_leaf=is_spec)

  def local(state, tok):
    m = nnx.merge(graphdef, state)
    if not layers:
      return forward_local(m, tok, cp, param_specs), {}
    logits, acts = capture.run(forward_local, m, tok, cp, param_specs)
    return logits, {n: acts[n] for n in layers if n in acts}

  # check_vma=False: the Pallas kernels' outputs carry no mesh-varying annotation; the tests
  # check the gradients of the replicated parameters under exactly this setting.
  seq = P(batch_axes, cp.axis_name, None)
  logits, acts = jax.shard_map(local, mesh=mesh, in_specs=(state_specs, spec),
                               out_specs=(seq, seq), check_vma=False)(
                                   state, zigzag_shard(tokens, cp.size))
  if zigzag_output:
    return logits, acts
  return zigzag_unshard(logits, cp.size), {n: zigzag_unshard(a, cp.size) for n, a in acts.items()}


def context_parallel_logits(model, tokens: jax.Array, mesh, cp: ContextParallel,
                            batch_axes=None, zigzag_output: bool = False) -> jax.Array:
  """tokens [B, L] (global order) -> logits [B, L, V] computed on the context-parallel mesh
  (``context_parallel_forward`` without activations)."""
  return context_parallel_forward(model, tokens, mesh, cp, batch_axes, zigzag_output)[0]
