"""Model checkpoints on disk: an Orbax composite of ``params`` (the nnx.Param state) and
``config`` (the ModelConfig as JSON). Written atomically by Orbax (temporary dir + rename).

The trainer's CheckpointManager steps hold the same two items (plus optimizer, data and RNG
state), so ``load_model`` reads a converted checkpoint, a single step directory, or a training
workdir (its latest complete step).
"""

from __future__ import annotations

import asyncio
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from sh2_jax.config import ModelConfig
from sh2_jax.model import StripedHyena


def _orbax_cancels_leftover_reads() -> None:
  """Work around an Orbax bug (0.12.8) that prints dozens of ``RuntimeError: Event loop is
  closed`` tracebacks whenever a restore fails (a damaged checkpoint, even one we then fall
  back from correctly). Orbax runs each restore on a fresh asyncio loop
  (``asyncio_utils._run_sync_via_new_loop``: ``run_until_complete`` + ``close``, not
  ``asyncio.run``); when one array's read fails, ``asyncio.gather`` raises at once and the loop
  is closed while the other arrays' TensorStore reads are still in flight. As each finishes,
  TensorStore's completion callback calls ``loop.call_soon_threadsafe`` on the closed loop and
  reports the error through ``sys.unraisablehook``: one traceback per leftover read.

  Here the leftover tasks are cancelled and awaited, as ``asyncio.run`` does; and a loop that
  had leftovers is not closed but left to the garbage collector: a TensorStore read finishing
  on another thread at the moment of cancelling may still deliver its result later, which an
  open loop accepts silently (each pending callback keeps the loop alive until it ran). Applied
  once, on import of this module, which every checkpoint read and write of the package goes
  through."""
  from orbax.checkpoint._src import asyncio_utils
  original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
  if original is None or getattr(original, "cancels_leftovers", False):
    return  # another Orbax layout (tests/train/test_robustness.py shows if the bug remains)

  def run_sync_via_new_loop(coro):
    loop = asyncio.new_event_loop()
    leftover = set()
    try:
      asyncio.set_event_loop(loop)
      return loop.run_until_complete(coro)
    finally:
      try:
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
          task.cancel()
        if leftover:
          loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
      finally:
        asyncio.set_event_loop(None)
        if not leftover:
          loop.close()

  run_sync_via_new_loop.cancels_leftovers = True
  asyncio_utils._run_sync_via_new_loop = run_sync_via_new_loop


_orbax_cancels_leftover_reads()


def save_model(directory: str, model: StripedHyena) -> None:
  """Write ``model``'s parameters and config to ``directory`` (must not exist)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise ValueError(f"checkpoint directory {directory!r} already exists; choose a new path")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave(model.cfg.to_dict())))


def _find_step_dir(directory: str) -> str:
  """A directory holding ``params``/``config`` items: ``directory`` itself, or the latest
  step under it (a CheckpointManager root, or a workdir with ``checkpoints/``)."""
  if os.path.isdir(os.path.join(directory, "params")):
    return directory
  for root in (directory, os.path.join(directory, "checkpoints")):
    if os.path.isdir(root):
      steps = sorted((int(n) for n in os.listdir(root) if n.isdigit()), reverse=True)
      for step in steps:
        cand = os.path.join(root, str(step))
        if os.path.isdir(os.path.join(cand, "params")):
          return cand
  raise ValueError(f"no sh2_jax checkpoint found in {directory!r}: expected a 'params' item "
                   "or numbered step directories holding one")


def read_config(directory: str) -> dict:
  """The ModelConfig dict stored with a checkpoint (``directory`` as for ``load_model``)."""
  step_dir = _find_step_dir(os.path.abspath(directory))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    return ckptr.restore(step_dir, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore_params(directory: str, target: dict) -> dict:
  """The stored parameters (``directory`` as for ``load_model``) restored into ``target``, a
  pure dict of arrays or ``jax.ShapeDtypeStruct`` (with shardings: each device reads its shard,
  so a model larger than one device restores straight into its FSDP layout)."""
  step_dir = _find_step_dir(os.path.abspath(directory))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    return ckptr.restore(step_dir, ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))["params"]


def load_model(directory: str, dtype=None, **overrides) -> StripedHyena:
  """Build the model described by the checkpoint and load its parameters.

  ``dtype`` sets the compute dtype (parameters keep their stored float32); ``overrides`` are
  extra ModelConfig fields (e.g. ``conv_impl='xla'``).
  """
  step_dir = _find_step_dir(os.path.abspath(directory))
  cfg_dict = read_config(step_dir)
  if dtype is not None:
    overrides["dtype"] = jnp.dtype(dtype).name
  cfg = ModelConfig.from_dict({**cfg_dict, **overrides})
  abstract = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
  params = restore_params(step_dir, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  graphdef, state = nnx.split(abstract)  # no random init: the weights come from disk
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
