"""Training checkpoints: an Orbax CheckpointManager under ``workdir/checkpoints``.

Each step directory holds the items
  params        pure dict of the nnx.Param state (as ``sh2_jax.checkpoint.save_model``)
  config        the ModelConfig as JSON           -> ``sh2_jax.checkpoint.load_model`` reads it
  opt_state     the Optax state
  state         ``step`` and the RNG key data
  data          the Grain iterator state (one file per process)
  train_config  the whole ml_collections config as JSON (for the record)
  checksums     two uint32 checksums per parameter and optimizer array
                (``sh2_jax.checkpoint.checksums``; ``load_model`` verifies them too)
Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so a killed run leaves at worst an unfinished temporary directory, which is ignored
and cleaned up. The checksums are verified after restoring, so flipped bits are caught. Restoring tries the
latest step first; a step that fails to restore or to verify is reported, renamed to
``<step>.damaged`` and the previous one is tried. A config whose model differs from the one the
checkpoints were written for is an input error (``check_compatible``, before anything is
written), not damage: the checkpoints stay as they are.
"""

from __future__ import annotations

import json
import os
import sys

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sh2_jax import checkpoint  # also its Orbax workaround: quiet fallbacks
from sh2_jax import config as config_lib

ITEMS = ("params", "config", "opt_state", "state", "data", "train_config", "checksums")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int, use_async: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=use_async, cleanup_tmp_directories=True,
      create=True)
  handlers = {
      "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
      "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
      "train_config": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler()}
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
      checksums=ocp.args.JsonSave(checkpoint.checksums({"params": params,
                                                        "opt_state": opt_state})),
      train_config=ocp.args.JsonSave(json.loads(json.dumps(train_cfg, default=str)))))


def _committed_steps(workdir: str) -> list[int]:
  root = checkpoint_dir(workdir)
  if not os.path.isdir(root):
    return []
  return sorted((int(d) for d in os.listdir(root) if d.isdigit() and os.path.exists(
      os.path.join(root, d, "config", "metadata"))), reverse=True)


def latest_model_config(workdir: str) -> dict | None:
  """The model config of the newest committed step in ``workdir`` (None: no checkpoint, a run
  there starts anew)."""
  steps = _committed_steps(workdir)
  if not steps:
    return None
  try:
    return json.load(open(os.path.join(checkpoint_dir(workdir), str(steps[0]), "config",
                                       "metadata")))
  except (OSError, ValueError):
    return {}  # unreadable: restore_latest treats the step as damaged


def check_compatible(workdir: str, model_cfg: dict, train_cfg) -> None:
  """Raise ValueError (an input error) when the newest checkpoint in ``workdir`` was written
  for another model or optimizer structure; names every differing field. Reads only."""
  steps = _committed_steps(workdir)
  if not steps:
    return
  path = os.path.join(checkpoint_dir(workdir), str(steps[0]))
  try:
    saved = json.load(open(os.path.join(path, "config", "metadata")))
  except (OSError, ValueError):
    return  # unreadable: restore_latest treats the step as damaged
  diffs = [f"model.{d}" for d in config_lib.shape_diffs(saved, model_cfg)]
  try:
    saved_train = json.load(open(os.path.join(path, "train_config", "metadata")))
    clip_then = saved_train["optimizer"]["grad_clip"] > 0
  except (OSError, ValueError, KeyError, TypeError):
    clip_then = None
  if clip_then is not None and clip_then != (train_cfg.optimizer.grad_clip > 0):
    diffs.append(f"optimizer.grad_clip: checkpoint {saved_train['optimizer']['grad_clip']!r}, "
                 f"config {train_cfg.optimizer.grad_clip!r} (clipping on/off changes the "
                 "optimizer state)")
  if clip_then is not None and bool(saved_train.get("freeze")) != bool(train_cfg.get("freeze")):
    diffs.append(f"freeze: checkpoint {saved_train.get('freeze', '')!r}, config "
                 f"{train_cfg.get('freeze', '')!r} (freezing on/off changes the optimizer state; "
                 "which groups are frozen may change)")
  if diffs:
    raise ValueError(f"the checkpoints in {checkpoint_dir(workdir)} (latest step {steps[0]}) "
                     f"were written for another model: " + "; ".join(diffs) +
                     ". Use a new --workdir, or drop the overrides; the checkpoints are left "
                     "untouched")


def _verify(mngr: ocp.CheckpointManager, step: int, params, opt_state) -> None:
  """The restored arrays against the checksums saved beside them."""
  checkpoint.verify_checksums(os.path.join(str(mngr.directory), str(step)),
                              {"params": params, "opt_state": opt_state})


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
      _verify(mngr, step, out["params"], out["opt_state"])
    except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
      msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      print(f"warning: checkpoint step {step} in {mngr.directory} is damaged "
            f"({type(e).__name__}: {msg}); renamed to {step}.damaged, trying the previous one",
            file=sys.stderr, flush=True)
      _set_damaged(mngr, step)
      continue
    return step, out["params"], out["opt_state"], out["state"]
  if steps:  # starting over silently would throw the run away
    raise RuntimeError(f"every checkpoint in {mngr.directory} is damaged (steps {steps}, now "
                       "renamed *.damaged); run again to start from scratch, or restore a copy")
  return None
