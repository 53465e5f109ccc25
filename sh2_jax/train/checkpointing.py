"""Training checkpoints: an Orbax CheckpointManager under ``workdir/checkpoints``.

Each step directory holds the items
  params        pure dict of the nnx.Param state (as ``sh2_jax.checkpoint.save_model``)
  config        the ModelConfig as JSON           -> ``sh2_jax.checkpoint.load_model`` reads it
  opt_state     the Optax state
  state         ``step`` and the RNG key data
  data          the Grain iterator state (one file per process)
  train_config  the whole ml_collections config as JSON (for the record)
Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so a killed run leaves at worst an unfinished temporary directory, which is ignored
and cleaned up. Restoring tries the latest step first; a step that fails to restore is reported,
renamed to ``<step>.damaged`` and the previous one is tried.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

ITEMS = ("params", "config", "opt_state", "state", "data", "train_config")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int, use_async: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=use_async, cleanup_tmp_directories=True,
      create=True)
  handlers = {
      "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
      "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
      "train_config": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, options=options,
                               item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, *, params, opt_state, state, data_iter,
         model_cfg: dict, train_cfg: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(model_cfg),
      train_config=ocp.args.JsonSave(json.loads(json.dumps(train_cfg, default=str)))))


def _set_damaged(mngr: ocp.CheckpointManager, step: int) -> None:
  """Move a step that failed to restore out of the manager's way (kept for inspection)."""
  path = os.path.join(str(mngr.directory), str(step))
  if jax.process_index() == 0:
    target = path + ".damaged"
    n = 1
    while os.path.exists(target):
      target, n = f"{path}.damaged{n}", n + 1
    os.rename(path, target)
  multihost_utils.sync_global_devices(f"sh2_jax_damaged_checkpoint_{step}")
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, *, abstract_params, abstract_opt_state,
                   abstract_state, data_iter):
  """(step, params, opt_state, state) of the latest step that restores, or None when there is
  no checkpoint. ``data_iter`` is set to the saved position in place."""
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
      msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      logging.error("checkpoint step %d in %s is damaged and was not used (%s: %s); "
                    "falling back to the previous checkpoint", step, mngr.directory,
                    type(e).__name__, msg)
      print(f"WARNING: checkpoint step {step} in {mngr.directory} is damaged "
            f"({type(e).__name__}: {msg}); renamed to {step}.damaged, trying the previous one",
            flush=True)
      _set_damaged(mngr, step)
      continue
    return step, out["params"], out["opt_state"], out["state"]
  if steps:  # starting over silently would throw the run away
    raise RuntimeError(f"every checkpoint in {mngr.directory} is damaged (steps {steps}, now "
                       "renamed *.damaged); run again to start from scratch, or restore a copy")
  return None
