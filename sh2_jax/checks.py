"""Checks of a model against the inputs and the machine, shared by every command (sh2-train's
train, eval and ``--dry_run``; sh2-generate, sh2-score, sh2-embed, sh2-convert; the loaders
behind them), so one bad value gets one message wherever it comes in. Each raises a ValueError
naming the value and what would be valid; none allocates, compiles or writes (shapes come from
the abstract model).

  backend(cfg)                     the implementations and compute dtype run on this backend
  length(what, n, max_seqlen)      a sequence fits the model's max_seqlen
  token_ids(rows, names, vocab)    every id is inside the model's vocabulary
  fsdp(params, specs, mesh_shape)  every sharded dimension divides by its mesh axes
  memory(params, specs, ...)       parameters (and optimizer state) fit one device's memory
  model(cfg, mesh_shape, ...)      all of the above that concern one model on one mesh

Device memory is the device's own ``bytes_limit`` (GPU); on CPU, where XLA reports none, the
host's physical memory shared by its local devices.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from sh2_jax import dispatch
from sh2_jax.config import ModelConfig
from sh2_jax.model import StripedHyena
from sh2_jax.sharding import param_specs


# The loaders (``checkpoint.load_model``, ``zoo.load``) hold every parameter on one device.
LOAD_HINT = "; load it on a device with more memory"


def backend(cfg: ModelConfig) -> None:
  """The model's ``conv_impl``, ``li_impl``, ``attention_impl``, ``decode_attention_impl`` and
  compute ``dtype`` can run on this backend (``sh2_jax.dispatch`` decides)."""
  dispatch.resolve_conv_impl(cfg.conv_impl)
  dispatch.resolve_li_impl(cfg.li_impl)
  dispatch.resolve_attention_impl(cfg.attention_impl, cfg.dtype)  # named, so it must run here
  dispatch.resolve_decode_attention_impl(cfg.decode_attention_impl, cfg.dtype)
  dispatch.check_compute_dtype(cfg.dtype)


def length(what: str, n: int, max_seqlen: int, hint: str = "") -> None:
  """``n`` tokens must fit the model's ``max_seqlen``; ``what`` names them with their number
  (``seq_len 300``, ``--fasta record 'x' of 300 tokens``)."""
  if n > max_seqlen:
    raise ValueError(f"{what} is more than the model's max_seqlen {max_seqlen}{hint}")


def token_ids(rows: Sequence[np.ndarray], names: Sequence[str], vocab_size: int) -> None:
  """Every id of every row is in 0..vocab_size-1 (a model with fewer than 256 tokens cannot read
  every byte); ``names`` says what each row is (``--fasta record 'x'``)."""
  for row, name in zip(rows, names):
    row = np.asarray(row)
    if row.size and (row.min() < 0 or row.max() >= vocab_size):
      bad = int(row.max() if row.max() >= vocab_size else row.min())
      char = f" ({chr(bad)!r})" if 32 < bad < 127 else ""
      raise ValueError(f"{name} has token id {bad}{char} outside the vocabulary "
                       f"0..{vocab_size - 1}")


def abstract_params(cfg: ModelConfig) -> tuple[dict, dict]:
  """(pure dict of the parameters' ShapeDtypeStructs, their PartitionSpecs), by abstract
  evaluation: a 40B model costs no memory."""
  abstract = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), param_specs(abstract)


def _name(path) -> str:
  return ".".join(str(getattr(k, "key", k)) for k in path)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def fsdp(params: dict, specs: dict, mesh_shape: dict) -> None:
  """Every dimension a parameter is sharded on must divide by the size of its mesh axes (no
  silent replication): an error naming the parameter, its shape and the mesh size."""
  flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec))
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    for dim, entry in zip(x.shape, flat_specs[path]):
      size = math.prod(mesh_shape[a] for a in _axes(entry))
      if size > 1 and dim % size:
        axes = " x ".join(f"mesh.{a} {mesh_shape[a]}" for a in _axes(entry))
        names = " x ".join(f"mesh.{a}" for a in _axes(entry))
        raise ValueError(f"parameter {_name(path)} of shape {tuple(x.shape)} cannot be sharded "
                         f"over {axes} (= {size} devices): {dim} is not divisible by {size}; "
                         f"choose {names} dividing {dim}")


def _is_spec(x) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def device_memory() -> tuple[int | None, str]:
  """(bytes one local device can hold or None, where that figure comes from)."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - a backend without memory statistics
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"the {device.device_kind} memory"
  if device.platform == "cpu":
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = jax.local_device_count()
    return host // n, "the host's physical memory" + (f" / {n} host devices" if n > 1 else "")
  return None, f"unknown ({device.platform} reports no memory limit)"


def gib(n: float) -> str:
  """Bytes for people: MiB, GiB or TiB."""
  if n >= 2**40:
    return f"{n / 2**40:.1f} TiB"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory(params: dict, specs: dict, mesh_shape: dict | None = None, optimizer_state=None,
           limit: int | None = None, hint: str = "") -> int:
  """Parameters, and ``optimizer_state`` (an abstract tree, sharded like the parameters), per
  device on a mesh of ``mesh_shape`` (None: one device holds everything) must fit ``limit``
  bytes (default: ``device_memory()``). Returns the bytes per device. Activations and
  temporaries come on top: ``sh2-train --memory`` reports the whole step."""
  flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec))
  per_device = total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    shards = 1 if mesh_shape is None else math.prod(
        mesh_shape[a] for e in flat_specs[path] for a in _axes(e))
    per_device, total = per_device + nbytes // shards, total + nbytes
  opt_total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                  for x in jax.tree.leaves(optimizer_state)) if optimizer_state is not None else 0
  opt_device = per_device * opt_total // max(total, 1)  # optimizer leaves mirror the parameters
  limit, where = device_memory() if limit is None else (limit, "the given limit")
  need = per_device + opt_device
  if limit is not None and need > limit:
    where = f"{gib(limit)} ({where})"
    if optimizer_state is None and mesh_shape is None:
      raise ValueError(f"the model's parameters need {gib(need)} on one device, more than "
                       f"{where}{hint}")
    mesh = "" if mesh_shape is None else f" on mesh {mesh_shape}"
    raise ValueError(f"the model needs {gib(need)} per device{mesh} for its parameters "
                     f"({gib(per_device)})" + (f" and optimizer state ({gib(opt_device)})"
                                               if optimizer_state is not None else "") +
                     f" alone, more than {where}{hint}")
  return need


def model(cfg: ModelConfig, mesh_shape: dict | None = None, optimizer_state_of=None,
          hint: str = "") -> int:
  """``backend``, ``fsdp`` (given a mesh) and ``memory`` of the model ``cfg`` describes.
  ``optimizer_state_of``: params -> the abstract optimizer state (training). Returns the
  bytes per device ``memory`` counted."""
  backend(cfg)
  params, specs = abstract_params(cfg)
  if mesh_shape is not None:
    fsdp(params, specs, mesh_shape)
  opt = jax.eval_shape(optimizer_state_of, params) if optimizer_state_of is not None else None
  return memory(params, specs, mesh_shape, opt, hint=hint)
