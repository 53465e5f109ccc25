"""Evaluation of a checkpoint: ``evaluate(config, checkpoint)``.

Loads any of our Orbax checkpoints through ``sh2_jax.checkpoint.load_model`` (a training
workdir — its latest step —, a step directory, or a converter output) and reports loss,
perplexity and bits per byte on the held-out split of ``config.data``
(``data.eval_fraction=1.0`` evaluates the whole dataset).
"""

from __future__ import annotations

import functools
import json
import os

import jax
from flax import nnx

from sh2_jax.checkpoint import load_model, model_config
from sh2_jax.train import check
from sh2_jax.train import mesh as mesh_lib
from sh2_jax.train.step import eval_step
from sh2_jax.train.trainer import place, prepare, run_eval


def prepare_eval(config, checkpoint: str):
  """Every input check of ``evaluate`` (config, mesh, data, checkpoint); writes nothing."""
  _, mesh, (_, eval_src) = prepare(config, "eval")
  out_dir = os.path.dirname(os.path.abspath(config.eval_output)) if config.eval_output else None
  if out_dir is not None and not os.path.isdir(out_dir):
    raise ValueError(f"eval_output {config.eval_output!r}: directory {out_dir!r} does not exist")
  if len(eval_src) == 0:
    raise ValueError("the held-out split is empty; raise data.eval_fraction (1.0 evaluates the "
                     "whole dataset) or give more data")
  if not os.path.exists(checkpoint):
    raise ValueError(f"checkpoint path {checkpoint!r} does not exist")
  model_cfg = model_config(checkpoint, config.model.dtype)  # the checkpoint's model is evaluated
  check.check_data_fits(config, model_cfg, "the checkpoint's model")
  check.check_model(config, model_cfg, dict(mesh.shape), training=False)
  model = load_model(checkpoint, dtype=config.model.dtype)
  return mesh, eval_src, model


def evaluate(config, checkpoint: str, prepared=None) -> dict:
  """Returns (and prints, as one JSON line) the summary."""
  mesh, eval_src, model = prepared or prepare_eval(config, checkpoint)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  p_sh = mesh_lib.param_shardings(mesh, params, mesh_lib.param_specs(model))
  params = place(jax.device_get(params), p_sh)
  b_sh = {k: mesh_lib.batch_sharding(mesh) for k in ("inputs", "targets", "weights")}
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, mesh=mesh,
                                      context_modes=dict(config.context_parallel)),
                    in_shardings=(p_sh, b_sh), out_shardings=mesh_lib.replicated(mesh))
  result = run_eval(eval_fn, params, mesh, eval_src, config.batch_size, config.eval_batches,
                    progress=jax.process_index() == 0)
  summary = {"checkpoint": checkpoint, "data": config.data.path or "default",
             "windows": len(eval_src), "seq_len": config.seq_len, **result}
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)
    if config.eval_output:
      with open(config.eval_output, "w") as f:
        json.dump(summary, f, indent=2)
  return summary
