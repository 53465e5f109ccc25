"""Model checkpoints on disk: an Orbax composite of ``params`` (the nnx.Param state) and
``config`` (the ModelConfig as JSON). Written atomically by Orbax (temporary dir + rename).

The trainer's CheckpointManager steps hold the same two items (plus optimizer, data and RNG
state), so ``load_model`` reads a converted checkpoint, a single step directory, or a training
workdir (its latest complete step).
"""

from __future__ import annotations

import asyncio
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sh2_jax import checks
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


def _reason(error: Exception, step_dir: str) -> str:
  """A library's error in one short line: TensorStore's spec dump dropped, the checkpoint's own
  path shortened, at most ~300 characters."""
  msg = " ".join(str(error).split()).split(" [tensorstore_spec=")[0]
  msg = msg.replace(f'local file "{step_dir}/', '"').replace(f"{step_dir}/", "")
  msg = f"{type(error).__name__}: {msg}" if msg else type(error).__name__
  return msg if len(msg) <= 300 else f"{msg[:120]} ... {msg[-170:]}"


class DamagedCheckpoint(ValueError):
  """A checkpoint's files cannot be read, do not fit its config, or fail their checksums."""


def _unreadable(step_dir: str, what: str, error: Exception) -> DamagedCheckpoint:
  return DamagedCheckpoint(f"checkpoint {step_dir!r}: {what} cannot be read "
                           f"({_reason(error, step_dir)}); the files are damaged, incomplete or "
                           "not an sh2_jax checkpoint")


def read_config(directory: str) -> dict:
  """The ModelConfig dict stored with a checkpoint (``directory`` as for ``load_model``); an
  unreadable one is a ValueError naming the checkpoint."""
  step_dir = _find_step_dir(os.path.abspath(directory))
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      saved = ckptr.restore(step_dir, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except Exception as e:  # noqa: BLE001 - whatever the reader raises, the files are at fault
    raise _unreadable(step_dir, "its model config", e) from None
  if not isinstance(saved, dict):
    raise DamagedCheckpoint(f"checkpoint {step_dir!r}: its model config is a "
                            f"{type(saved).__name__}, not a dict of ModelConfig fields")
  return saved


def fingerprint(tree) -> dict:
  """Per-array checksums (uint32): the wrapped sum of the array's 32-bit words, and the same
  weighted by position, so any flipped bit and any swap of elements changes them."""
  def one(x):
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
      w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      w = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    w = w.reshape(-1)
    pos = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * pos, dtype=jnp.uint32)])
  return jax.tree.map(one, tree)


def checksums(tree) -> dict[str, list[int]]:
  """``fingerprint`` as JSON: key path (``jax.tree_util.keystr``) -> two ints. Training
  checkpoints store it for ``{"params": ..., "opt_state": ...}``."""
  sums = jax.device_get(fingerprint(tree))
  return {jax.tree_util.keystr(k): [int(v) for v in np.asarray(s)]
          for k, s in jax.tree_util.tree_leaves_with_path(sums)}


def verify_checksums(step_dir: str, tree) -> None:
  """Compare the arrays of ``tree`` (keyed as at save: ``{"params": ...}``, optionally
  ``"opt_state"``) with the checksums saved in ``step_dir``; a mismatch is a ``DamagedCheckpoint``.
  Checkpoints without checksums (converted ones, steps saved before checksums existed) are
  trusted."""
  path = os.path.join(step_dir, "checksums", "metadata")
  if not os.path.exists(path):
    return
  try:
    want = json.load(open(path))
  except (OSError, ValueError) as e:
    raise _unreadable(step_dir, "its checksums", e) from None
  got = checksums(tree)
  bad = sorted(k for k in got if want.get(k) != got[k])
  if bad:
    raise DamagedCheckpoint(f"checksum mismatch in {len(bad)} arrays ({', '.join(bad[:3])}"
                            f"{' …' if len(bad) > 3 else ''}): the files were altered")


def check_stored_params(directory: str, target: dict) -> None:
  """The stored parameters' names and shapes (Orbax's metadata: no array data is read) must be
  those of ``target`` (a pure dict of arrays or ``ShapeDtypeStruct``); otherwise a
  ``DamagedCheckpoint`` naming the checkpoint and the parameters that differ. ``directory`` as
  for ``load_model``."""
  from etils import epath
  step_dir = _find_step_dir(os.path.abspath(directory))
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "params")
  except Exception as e:  # noqa: BLE001
    raise _unreadable(step_dir, "its parameters", e) from None

  def flat(tree):
    return {".".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  have, want = flat(stored), flat(target)
  diffs = ([f"{n} is missing" for n in sorted(set(want) - set(have))] +
           [f"{n} is not in the model" for n in sorted(set(have) - set(want))] +
           [f"{n} has shape {have[n]}, the model {want[n]}" for n in sorted(set(want) & set(have))
            if have[n] != want[n]])
  if diffs:
    raise DamagedCheckpoint(f"checkpoint {step_dir!r}: its parameters do not fit the model its "
                            f"config describes ({len(diffs)} differ: {'; '.join(diffs[:3])}"
                            f"{'; ...' if len(diffs) > 3 else ''}); the checkpoint is damaged "
                            "or was written by other code")


def restore_params(directory: str, target: dict) -> dict:
  """The stored parameters (``directory`` as for ``load_model``) restored into ``target``, a
  pure dict of arrays or ``jax.ShapeDtypeStruct`` (with shardings: each device reads its shard,
  so a model larger than one device restores straight into its FSDP layout). Parameters that
  do not fit ``target``, cannot be read or fail the checksums saved with them (training
  checkpoints): a ``DamagedCheckpoint`` naming the checkpoint."""
  step_dir = _find_step_dir(os.path.abspath(directory))
  check_stored_params(step_dir, target)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      params = ckptr.restore(step_dir, ocp.args.Composite(
          params=ocp.args.StandardRestore(target)))["params"]
  except Exception as e:  # noqa: BLE001 - whatever the reader raises, the files are at fault
    raise _unreadable(step_dir, "its parameters", e) from None
  try:
    verify_checksums(step_dir, {"params": params})
  except DamagedCheckpoint as e:
    raise DamagedCheckpoint(f"checkpoint {step_dir!r}: {e}") from None
  return params


def model_config(directory: str, dtype=None, **overrides) -> ModelConfig:
  """The ModelConfig stored with a checkpoint (``directory`` as for ``load_model``) with
  ``overrides`` (``dtype``: the compute dtype); a stored config that is not valid is a
  ValueError naming the checkpoint."""
  step_dir = _find_step_dir(os.path.abspath(directory))
  cfg_dict = read_config(step_dir)
  try:
    ModelConfig.from_dict(cfg_dict)
  except (ValueError, TypeError) as e:
    raise DamagedCheckpoint(f"checkpoint {step_dir!r}: its stored model config is not valid "
                            f"({e})") from None
  if dtype is not None:
    overrides["dtype"] = jnp.dtype(dtype).name
  return ModelConfig.from_dict({**cfg_dict, **overrides})


def load_model(directory: str, dtype=None, **overrides) -> StripedHyena:
  """Build the model described by the checkpoint and load its parameters.

  ``dtype`` sets the compute dtype (parameters keep their stored float32); ``overrides`` are
  extra ModelConfig fields (e.g. ``conv_impl='xla'``). A damaged checkpoint (unreadable files,
  an invalid stored config, parameters that do not fit it or their checksums) is a ValueError
  naming it.
  """
  step_dir = _find_step_dir(os.path.abspath(directory))
  cfg = model_config(step_dir, dtype, **overrides)
  checks.model(cfg, hint=checks.LOAD_HINT)  # runs on this backend, fits one device: before any read
  abstract = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
  params = restore_params(step_dir, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  graphdef, state = nnx.split(abstract)  # no random init: the weights come from disk
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
