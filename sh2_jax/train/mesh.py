"""The device mesh ('data', 'fsdp', 'context') and the shardings built on it.

Parameters carry mesh-axis names in their NNX metadata (``out_sharding=('fsdp', None)`` ...);
``param_shardings`` turns them into NamedShardings. Batches are split over ('data', 'fsdp')
(FSDP shards parameters but every device still reads its own rows) and their sequence over
'context' (the context-parallel model path consumes that axis; size 1 until it is used).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sh2_jax import checks
from sh2_jax.sharding import AXES, BATCH_AXES, FSDP_AXES, param_specs

__all__ = ["AXES", "BATCH_AXES", "FSDP_AXES", "batch_sharding", "global_batch", "make_mesh",
           "mesh_shape", "opt_state_shardings", "param_shardings", "param_specs", "replicated"]


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve ``config.mesh`` (one axis may be -1: all remaining devices) against the device
  count, or raise a ValueError naming the sizes."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.context]
  for name, s in zip(AXES, sizes):
    if not isinstance(s, int) or (s < 1 and s != -1):
      raise ValueError(f"mesh.{name} {s!r} is not valid; expected a positive integer or -1")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} has more than one axis set to -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if num_devices % rest:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} is impossible with {num_devices} "
                       f"device(s): {rest} does not divide {num_devices}")
    sizes[sizes.index(-1)] = num_devices // rest
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are available; the product of the axes must equal the "
                     "device count (set one axis to -1 to fill)")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg) -> Mesh:
  shape = mesh_shape(mesh_cfg, jax.device_count())
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, L] arrays: rows over ('data', 'fsdp'), sequence over 'context'."""
  return NamedSharding(mesh, P(BATCH_AXES, "context"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(mesh: Mesh, abstract_params: dict, specs: dict) -> dict:
  """NamedShardings for a pure param dict; an annotated dimension that the mesh axis does not
  divide is an error naming the parameter (``checks.fsdp``: no silent replication)."""
  checks.fsdp(abstract_params, specs, dict(mesh.shape))
  return jax.tree.map(lambda _, spec: NamedSharding(mesh, spec), abstract_params, specs)


def opt_state_shardings(mesh: Mesh, tx, abstract_opt, p_sh: dict):
  """The optimizer state's shardings: each per-parameter leaf (moments ...) as its parameter,
  everything else (step counts, schedules) replicated."""
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh,
                               transform_non_params=lambda _: replicated(mesh))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global jax.Arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
