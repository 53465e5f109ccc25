"""Validate a training/eval config before anything is written: every bad value raises one
ValueError that names it and what would be valid.

  validate(config, mode)                       keys and values of the config alone
  check_against_mesh(config, mesh_shape, n)    batch and sequence split over the mesh
  check_model(config, model_cfg, mesh_shape)   the model on the mesh: FSDP divisibility and
                                               parameters + optimizer state per device against
                                               the device's memory (``sh2_jax.checks``)
"""

from __future__ import annotations

import math

import ml_collections

from sh2_jax import checks
from sh2_jax.config import REMAT_MODES as REMAT, ModelConfig

MODES = ("train", "eval")
BYTE_TOKENS = 256  # token ids the byte-level data pipeline emits (sh2_jax/tokenizer.py)


def _reference() -> ml_collections.ConfigDict:
  from sh2_jax.configs.base import make_config  # the one list of training keys
  return make_config("tiny")


def _check_keys(config, reference, prefix: str = "") -> None:
  for key in config.keys():
    if key == "model" and not prefix:
      continue  # checked by ModelConfig.from_dict
    if key not in reference:
      raise ValueError(f"unknown config key {prefix + key!r}; valid keys here: "
                       f"{sorted(k for k in reference.keys() if k != 'model')}")
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ValueError(f"config key {prefix + key!r} must be a sub-dict")
      _check_keys(config[key], reference[key], f"{prefix}{key}.")


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value > 0 or (allow_zero and value == 0))
  if not ok:
    raise ValueError(f"{name} {value!r} is not valid; expected a "
                     f"{'non-negative' if allow_zero else 'positive'} integer")


def validate(config, mode: str = "train") -> ModelConfig:
  """Check keys and values of ``config``; returns the ModelConfig of ``config.model``."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} is not valid; expected one of {', '.join(MODES)}")
  _check_keys(config, _reference())
  if "model" not in config:
    raise ValueError("config has no 'model' sub-dict")
  model_cfg = ModelConfig.from_dict(config.model)
  for name in ("num_steps", "log_every", "batch_size", "seq_len", "keep_checkpoints"):
    _positive_int(name, config[name])
  for name in ("checkpoint_every", "eval_every", "eval_batches", "seed"):
    _positive_int(name, config[name], allow_zero=True)
  _positive_int("optimizer.grad_accum_steps", config.optimizer.grad_accum_steps)
  _positive_int("optimizer.warmup_steps", config.optimizer.warmup_steps, allow_zero=True)
  if config.remat not in REMAT:
    raise ValueError(f"remat {config.remat!r} is not valid; expected one of {', '.join(REMAT)}")
  from sh2_jax.train.step import LATENCY_HIDING
  if config.latency_hiding not in LATENCY_HIDING:
    raise ValueError(f"latency_hiding {config.latency_hiding!r} is not valid; expected one of "
                     f"{', '.join(LATENCY_HIDING)}")
  from sh2_jax.parallel.context import ContextParallel
  try:
    ContextParallel(size=1, **dict(config.context_parallel))
  except ValueError as e:
    raise ValueError(f"{e} (config.context_parallel)") from None
  _positive_int("max_nonfinite_logs", config.max_nonfinite_logs, allow_zero=True)
  checks.backend(model_cfg)  # the implementations and dtype must run on this backend
  lr = config.optimizer.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ValueError(f"optimizer.learning_rate {lr!r} must be a finite number > 0")
  clip = config.optimizer.grad_clip
  if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip >= 0):
    raise ValueError(f"optimizer.grad_clip {clip!r} is not valid; expected a finite number >= 0 "
                     "(0 turns clipping off)")
  check_data_fits(config, model_cfg)
  if config.batch_size % config.optimizer.grad_accum_steps:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                     f"optimizer.grad_accum_steps {config.optimizer.grad_accum_steps}")
  return model_cfg


def check_against_mesh(config, mesh_shape: dict, process_count: int) -> None:
  """The batch and sequence must split evenly over the mesh and the processes."""
  rows = mesh_shape["data"] * mesh_shape["fsdp"]
  micro = config.batch_size // config.optimizer.grad_accum_steps
  if micro % rows:
    what = (f"batch_size {config.batch_size}" if config.optimizer.grad_accum_steps == 1 else
            f"the microbatch {micro} (batch_size {config.batch_size} / grad_accum_steps "
            f"{config.optimizer.grad_accum_steps})")
    raise ValueError(f"{what} is not divisible by the data axes of the mesh: data "
                     f"{mesh_shape['data']} x fsdp {mesh_shape['fsdp']} = {rows}")
  if config.batch_size % process_count:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the number of "
                     f"processes {process_count}")
  n = mesh_shape["context"]
  chunks = 2 * n if n > 1 else 1  # zig-zag: two chunks per context rank
  if config.seq_len % chunks:
    why = " (zig-zag: 2 chunks per rank)" if n > 1 else ""
    raise ValueError(f"seq_len {config.seq_len} cannot be split over mesh.context {n}: it must "
                     f"be a multiple of {chunks}{why}")


def check_data_fits(config, model_cfg: ModelConfig, what: str = "model") -> None:
  """The windows of ``config.seq_len`` byte tokens fit the model (its vocabulary, its
  max_seqlen); ``what`` names the model in the messages."""
  if model_cfg.vocab_size < BYTE_TOKENS:
    raise ValueError(f"{what}.vocab_size {model_cfg.vocab_size} is below the {BYTE_TOKENS} byte "
                     f"tokens the data pipeline produces; expected >= {BYTE_TOKENS}")
  checks.length(f"seq_len {config.seq_len}", config.seq_len, model_cfg.max_seqlen,
                "; raise model.max_seqlen or shorten seq_len" if what == "model" else
                "; shorten seq_len")


MEMORY_HINT = ("; shard the parameters over more devices (config.mesh.fsdp), shrink the model, "
               "or see the whole train step's memory with --memory")


def check_model(config, model_cfg: ModelConfig, mesh_shape: dict, training: bool = True) -> int:
  """The model of ``model_cfg`` on a mesh of ``mesh_shape``: every FSDP-sharded dimension
  divides by the FSDP size, and its parameters (with ``training``, plus the optimizer's state)
  fit one device. From the abstract model: nothing is allocated or compiled. Returns those
  bytes per device."""
  optimizer_state_of = None
  if training:
    from sh2_jax.train.optim import freeze_prefixes, make_optimizer
    optimizer_state_of = make_optimizer(config.optimizer, config.num_steps,
                                        freeze_prefixes(config.freeze)).init
  return checks.model(model_cfg, mesh_shape, optimizer_state_of, hint=MEMORY_HINT)
