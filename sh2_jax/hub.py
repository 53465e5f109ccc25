"""Released Evo 2 weights by name: a local cache of converted checkpoints, filled once from a
Hugging Face hub snapshot in the reference layout.

``load_released("evo2_7b_base")`` looks in this order:
  1. ``<cache>/evo2_7b_base``, the converted sh2_jax checkpoint, with ``<cache>`` =
     ``$SH2_JAX_CACHE``, else ``$XDG_CACHE_HOME/sh2_jax``, else ``~/.cache/sh2_jax``;
  2. the model's Hugging Face repository (``presets.RELEASES``: ``arcinstitute/evo2_7b_base``)
     through ``huggingface_hub.snapshot_download``, which uses the hub's own cache
     (``HF_HOME`` / ``HF_HUB_CACHE``) and downloads only when online (``HF_HUB_OFFLINE=1`` or
     ``local_files_only=True`` stay offline). Only ``<name>.pt`` or its byte shards
     ``<name>.pt.part0..N`` are fetched; shards are read in place, never merged. The checkpoint is
     converted with the preset (the shapes of the reference config that name is paired with)
     and written to (1), so the conversion happens once;
  3. neither: one ``WeightsNotFound`` (a ValueError) saying what to download and where to put it.
"""

from __future__ import annotations

import os

from absl import logging

from sh2_jax import presets
from sh2_jax.config import shape_diffs


class WeightsNotFound(ValueError):
  """No converted weights in the cache and no reference checkpoint from the hub."""


def cache_root() -> str:
  """The directory of converted checkpoints, one sub-directory per model name."""
  if os.environ.get("SH2_JAX_CACHE"):
    return os.path.abspath(os.path.expanduser(os.environ["SH2_JAX_CACHE"]))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sh2_jax")


def cached_path(name: str) -> str:
  return os.path.join(cache_root(), name)


def _offline(local_files_only: bool | None) -> bool:
  if local_files_only is not None:
    return local_files_only
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE)


def reference_checkpoint(name: str, local_files_only: bool | None = None) -> str:
  """The path of ``<name>.pt`` in the model's hub snapshot (with ``.partN`` shards beside it
  instead when the repository holds shards; ``torch_pickle`` reads either)."""
  import huggingface_hub
  from huggingface_hub import errors
  release = presets.RELEASES[name]
  file = release.filename(name)
  offline = _offline(local_files_only)
  try:
    snapshot = huggingface_hub.snapshot_download(
        release.repo, allow_patterns=[file, f"{file}.part*"], local_files_only=offline)
  except (OSError, errors.HfHubHTTPError) as e:
    why = ("the Hugging Face cache holds no snapshot of it and downloading is off "
           "(HF_HUB_OFFLINE=1 or local_files_only)" if offline else
           f"the Hugging Face hub could not be reached or refused ({type(e).__name__})")
    raise WeightsNotFound(_download_message(name, why)) from None
  path = os.path.join(snapshot, file)
  if not (os.path.exists(path) or os.path.exists(path + ".part0")):
    raise WeightsNotFound(_download_message(
        name, f"the snapshot {snapshot} holds neither {file} nor {file}.part0"))
  return path


def _download_message(name: str, why: str) -> str:
  release = presets.RELEASES[name]
  file = release.filename(name)
  return (f"no weights for {name!r}: nothing converted in {cached_path(name)}, and {why}. "
          f"Download {file} (or its shards {file}.part0, .part1, ...) from the Hugging Face "
          f"repository {release.repo} into the Hugging Face cache, e.g. `hf download "
          f"{release.repo} --include '{file}*'` on a machine with internet (copy that cache "
          f"over and point HF_HOME at it), then load {name!r} again; or convert a copy kept "
          f"elsewhere into the cache: `sh2-convert --checkpoint PATH/{file} --config {name} "
          f"--output {cached_path(name)}` (in a checkout: python -m sh2_jax.convert)")


def check_converted(path: str, name: str, cfg_dict: dict) -> None:
  """The converted checkpoint at ``path`` must have preset ``name``'s shapes; otherwise one
  error naming the differing fields and the presets its shapes do match."""
  diffs = shape_diffs(cfg_dict, presets.get_preset(name).to_dict())
  if diffs:
    match = presets.matching_presets(cfg_dict)
    hint = (f"; its shapes match preset {' and '.join(match)}" if match else
            "; its shapes match no preset")
    raise ValueError(f"the checkpoint in {path} is not {name!r}: " + "; ".join(diffs) + hint +
                     f". Remove {path} to convert {name!r} again")


def load_released(name: str, dtype=None, local_files_only: bool | None = None, **overrides):
  """The ``StripedHyena`` of released model ``name`` (a key of ``presets.RELEASES``) with its
  weights: from the cache, else converted once from the hub snapshot (module docstring)."""
  from sh2_jax.checkpoint import load_model, read_config, save_model
  from sh2_jax.convert.vortex import from_vortex
  path = cached_path(name)
  if not os.path.isdir(path):
    pt = reference_checkpoint(name, local_files_only)
    logging.warning("converting %s once into %s", pt, path)
    model = from_vortex(pt, name)
    os.makedirs(cache_root(), exist_ok=True)
    if not os.path.isdir(path):  # another process may have finished first
      save_model(path, model)
    del model
  check_converted(path, name, read_config(path))
  return load_model(path, dtype=dtype, **overrides)
