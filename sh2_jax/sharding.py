"""Mesh axes and the FSDP spec, shared by the trainer (``train/``), the context-parallel forward
(``parallel/``) and the model's walk (its per-block parameter gather).

The device mesh has axes ('data', 'fsdp', 'context'). Parameters carry mesh-axis names in their
NNX metadata (``out_sharding=('fsdp', None)`` ...); the annotation 'fsdp' means the mesh axes
``FSDP_AXES``: every non-data device, so a context-parallel run keeps 1/(fsdp x context) of the
parameters and optimizer state per device and gathers one block's parameters at a time.
Batches are split over ``BATCH_AXES`` and their sequence over 'context'.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

AXES = ("data", "fsdp", "context")
BATCH_AXES = ("data", "fsdp")
FSDP_AXES = ("fsdp", "context")


def fsdp_spec(annotation: P, axes: tuple[str, ...] = FSDP_AXES) -> P:
  """A parameter's annotation with 'fsdp' -> ``axes`` (None where ``axes`` is empty)."""
  return P(*((axes or None) if a == "fsdp" else a for a in annotation))


def axis_size(mesh: Mesh, axis) -> int:
  """Size of a spec entry: one mesh axis name or a tuple of them."""
  return math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))


def is_spec(x) -> bool:
  return isinstance(x, P)


def param_specs(abstract_model: nnx.Module) -> dict:
  """Pure dict (same tree as ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) of
  PartitionSpecs from the parameters' sharding annotations, 'fsdp' -> ``FSDP_AXES``."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)))
  return jax.tree.map(fsdp_spec, specs, is_leaf=is_spec)


def fsdp_specs(state, mesh: Mesh) -> nnx.State:
  """PartitionSpecs of a module state from its annotations: 'fsdp' -> the FSDP_AXES of
  ``mesh``. A leaf whose annotated dimension their size does not divide stays whole (the
  trainer rejects such a model before this, ``train.mesh.param_shardings``; here it only
  costs memory)."""
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
