"""Fine-tuning: start a run from a checkpoint's parameters, optionally with frozen groups.

``config.init_from = CKPT`` (a converted Evo 2 checkpoint, one of our training workdirs — its
latest step — or a step directory) gives the new run its first parameters; the optimizer state
is fresh and the step count starts at 0. The checkpoint must have the config's parameter
shapes (one error naming every differing field, and the presets its shapes do match). How the
stored parameters become the model's filters is a property of the checkpoint, so
``mr_decay`` / ``mr_decay_length`` are taken from it (released Evo 2 weights hold the MR decay
multiplied in: ``none``), announced when they differ from the config. When the workdir already
holds checkpoints, the run resumes from them instead and ``init_from`` is not read.

Freezing parameter groups (``config.freeze``) is part of the optimizer: ``optim.py``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from sh2_jax.checkpoint import check_stored_params, read_config, restore_params
from sh2_jax.config import ModelConfig, shape_diffs
from sh2_jax.model import StripedHyena
from sh2_jax.presets import matching_presets
from sh2_jax.train.optim import param_path

ADOPTED_FIELDS = ("mr_decay", "mr_decay_length")


def resolve_init(config, model_cfg: ModelConfig, resumed: dict | None):
  """(model_cfg, the checkpoint to start from or None): checks ``config.init_from`` against the
  model (an input error names every difference) and adopts the checkpoint's
  ``ADOPTED_FIELDS``. ``resumed``: the model config of the workdir's newest checkpoint, when
  there is one; the run then resumes, ``init_from`` is not read (a line says so) and the fields
  come from that checkpoint, which has them from ``init_from``."""
  src = config.init_from
  if not src:
    return model_cfg, None
  if resumed is not None:
    print(f"the workdir holds checkpoints: resuming from them; init_from {src!r} is not used",
          flush=True)
    return _adopt(model_cfg, resumed), None
  src = os.path.expanduser(src)
  if not os.path.exists(src):
    raise ValueError(f"init_from {src!r} does not exist; expected a checkpoint directory (a "
                     "converted Evo 2 checkpoint, a training workdir or a step directory)")
  try:
    saved = read_config(src)
  except ValueError as e:
    raise ValueError(f"init_from: {e}") from None
  diffs = shape_diffs(saved, model_cfg.to_dict())
  if diffs:
    match = matching_presets(saved)
    hint = f"; its shapes match preset {' and '.join(match)}" if match else ""
    raise ValueError(f"init_from {src!r} holds another model: " +
                     "; ".join(f"model.{d}" for d in diffs) + hint)
  model_cfg = _adopt(model_cfg, saved)
  want = _leaf_shapes(model_cfg)
  have = _leaf_shapes(ModelConfig.from_dict({**saved, **{k: getattr(model_cfg, k) for k in (
      "dtype", "conv_impl", "li_impl", "attention_impl")}}))
  if want != have:
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    raise ValueError(f"init_from {src!r}: its parameters differ from this config's (checkpoint "
                     f"only: {', '.join(extra[:4]) or '-'}; config only: "
                     f"{', '.join(missing[:4]) or '-'}); model.fp8_projections is "
                     f"{saved.get('fp8_projections')!r} there, {model_cfg.fp8_projections!r} here")
  abstract = nnx.eval_shape(lambda: StripedHyena(model_cfg, rngs=nnx.Rngs(0)))
  try:  # the stored arrays' metadata: damage shows here, before the workdir is created
    check_stored_params(src, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  except ValueError as e:
    raise ValueError(f"init_from: {e}") from None
  return model_cfg, src


def _adopt(model_cfg: ModelConfig, saved: dict) -> ModelConfig:
  """``model_cfg`` with the checkpoint's ``ADOPTED_FIELDS``, announced where they differ."""
  adopted = {k: saved[k] for k in ADOPTED_FIELDS
             if k in saved and saved[k] != getattr(model_cfg, k)}
  if adopted:
    print("init_from: " + ", ".join(f"model.{k} {v!r} from the checkpoint (the config says "
                                    f"{getattr(model_cfg, k)!r})" for k, v in adopted.items()),
          flush=True)
  return dataclasses.replace(model_cfg, **adopted)


def _leaf_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: StripedHyena(model_cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return {param_path(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def init_params(checkpoint: str, abstract_params: dict) -> dict:
  """The checkpoint's parameters restored into ``abstract_params`` (``ShapeDtypeStruct``s with
  their shardings): global arrays, each device reading only its shard."""
  return restore_params(checkpoint, abstract_params)
