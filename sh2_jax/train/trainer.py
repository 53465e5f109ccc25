"""The training loop: ``train(config, workdir)``.

Order of work: validate the config, build the mesh, read the data — every bad input fails here,
before the workdir exists — then create or resume the run and train.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from sh2_jax import checks
from sh2_jax.config import ModelConfig
from sh2_jax.data import pipeline
from sh2_jax.flops import flops_per_token
from sh2_jax.model import StripedHyena
from sh2_jax.train import checkpointing, check, finetune, mesh as mesh_lib
from sh2_jax.train import metrics as metrics_lib
from sh2_jax.train.optim import (check_freeze, freeze_prefixes, learning_rate_schedule,
                                 make_optimizer)
from sh2_jax.train.step import compiler_options, eval_step, train_step


def prepare(config, mode: str):
  """Everything that can reject the inputs, with no side effects on disk.
  Returns (model_cfg, mesh, (train windows, eval windows))."""
  model_cfg = check.validate(config, mode)
  mesh = mesh_lib.make_mesh(config.mesh)
  check.check_against_mesh(config, dict(mesh.shape), jax.process_count())
  data = pipeline.load_dataset(config.data, config.seq_len)
  return model_cfg, mesh, data


def abstract_model(model_cfg: ModelConfig):
  return nnx.eval_shape(lambda: StripedHyena(model_cfg, rngs=nnx.Rngs(0)))


def init_params(model_cfg: ModelConfig, seed: int, shardings: dict) -> dict:
  """Random initial parameters, placed in their shards.

  The model is built eagerly (op by op; each op compiles once per shape) and then sharded:
  one jitted init of the 32-layer evo2_7b layout did not finish compiling within 4 minutes on an
  H100. The parameters pass through host memory, which bounds the model size this path serves.
  """
  model = StripedHyena(model_cfg, rngs=nnx.Rngs(seed))
  return place(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))), shardings)


def place(host_params: dict, shardings: dict) -> dict:
  """Host arrays (identical on every process) -> global arrays with ``shardings``."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
      host_params, shardings)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def run_eval(eval_fn, params, mesh, source, batch_size: int, max_batches: int,
             progress: bool = False) -> dict:
  """Mean loss, perplexity and bits per byte over (the first ``max_batches`` batches of)
  the windows in ``source``."""
  n = pipeline.num_eval_batches(source, batch_size, max_batches)
  it = pipeline.eval_batches(source, batch_size, jax.process_index(), jax.process_count(),
                             max_batches)
  nll, tokens = 0.0, 0.0
  for local in tqdm(it, total=n, desc="eval", disable=not progress, leave=False):
    out = jax.device_get(eval_fn(params, mesh_lib.global_batch(mesh, local)))
    nll, tokens = nll + float(out["nll"]), tokens + float(out["tokens"])
  loss = nll / max(tokens, 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)),
          "bits_per_byte": metrics_lib.bits_per_byte(loss), "tokens": int(tokens)}


def prepare_train(config, workdir: str | None = None):
  """``prepare`` plus the training iterator (an empty training split is an input error), the
  frozen groups and, given ``workdir``, the check that its checkpoints were written for this
  model, and the fine-tuning checkpoint (``config.init_from``; resuming wins); the model on the
  mesh (FSDP sizes, memory: ``check.check_model``). Returns
  (model_cfg, mesh, data_iter, eval_src, init_from checkpoint or None)."""
  model_cfg, mesh, (train_src, eval_src) = prepare(config, "train")
  resumed = None  # the model config of the workdir's newest checkpoint, if there is one
  if workdir is not None:
    above = os.path.abspath(workdir)
    while not os.path.exists(above):  # the folder it will be created in
      above = os.path.dirname(above)
    if not os.path.isdir(above):
      where = "" if above == os.path.abspath(workdir) else f": {above!r}"
      raise ValueError(f"--workdir {workdir!r}{where} is a file, not a directory")
    checkpointing.check_compatible(workdir, model_cfg.to_dict(), config)
    resumed = checkpointing.latest_model_config(workdir)
  model_cfg, init_from = finetune.resolve_init(config, model_cfg, resumed)
  check_freeze(config.freeze, nnx.to_pure_dict(nnx.state(abstract_model(model_cfg), nnx.Param)))
  check.check_model(config, model_cfg, dict(mesh.shape))
  data_iter = pipeline.train_iterator(train_src, config.batch_size, config.seed,
                                      jax.process_index(), jax.process_count())
  return model_cfg, mesh, data_iter, eval_src, init_from


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """The abstract state, shardings and jitted train step of a config on a mesh."""
  graphdef: Any
  abs_params: dict
  p_sh: dict
  tx: optax.GradientTransformation
  abs_opt: Any
  o_sh: Any
  repl: Any
  b_sh: dict
  step_fn: Any
  abs_batch: dict


def build_step(config, model_cfg: ModelConfig, mesh) -> StepSetup:
  """Everything the train step needs but the arrays (no memory allocated)."""
  abstract = abstract_model(model_cfg)
  graphdef, _ = nnx.split(abstract)
  abs_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  p_sh = mesh_lib.param_shardings(mesh, abs_params, mesh_lib.param_specs(abstract))
  tx = make_optimizer(config.optimizer, config.num_steps, freeze_prefixes(config.freeze))
  abs_opt = jax.eval_shape(tx.init, abs_params)
  o_sh = mesh_lib.opt_state_shardings(mesh, tx, abs_opt, p_sh)
  repl = mesh_lib.replicated(mesh)
  b_sh = {k: mesh_lib.batch_sharding(mesh) for k in ("inputs", "targets", "weights")}
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, remat=config.remat,
                        accum=config.optimizer.grad_accum_steps, mesh=mesh,
                        context_modes=dict(config.context_parallel)),
      in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, repl), donate_argnums=(0, 1),
      compiler_options=compiler_options(mesh, config.latency_hiding) or None)
  abs_batch = {k: jax.ShapeDtypeStruct((config.batch_size, config.seq_len),
                                       jnp.float32 if k == "weights" else jnp.int32, sharding=sh)
               for k, sh in b_sh.items()}
  return StepSetup(graphdef, abs_params, p_sh, tx, abs_opt, o_sh, repl, b_sh, step_fn, abs_batch)


def memory_report(config, model_cfg: ModelConfig, mesh, device_memory: float | None = None
                  ) -> dict:
  """XLA's memory analysis of the compiled train step, per device, in bytes: arguments
  (parameters, optimizer state, batch), temporaries, output, the donated (aliased) part, the
  total live at once, and the device's memory (``device_memory`` overrides, for planning on
  forced host devices). Compiles; allocates nothing."""
  s = build_step(config, model_cfg, mesh)
  compiled = s.step_fn.lower(_abstract(s.abs_params, s.p_sh), _abstract(s.abs_opt, s.o_sh),
                             s.abs_batch).compile()
  ma = compiled.memory_analysis()
  args, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  temp, alias = ma.temp_size_in_bytes, ma.alias_size_in_bytes
  if device_memory is None:
    device_memory = checks.device_memory()[0]  # on CPU: the host's memory shared by its devices
  return {"arguments": args, "temporaries": temp, "output": out, "aliased": alias,
          "total": args + temp + out - alias, "device_memory": device_memory,
          "devices": mesh.size, "mesh": dict(mesh.shape)}


def format_memory_report(rep: dict) -> str:
  gib = checks.gib
  lines = [f"train step memory per device (XLA's analysis of the compiled step; mesh "
           f"{rep['mesh']}, {rep['devices']} device(s)):",
           f"  arguments    {gib(rep['arguments'])}  (parameters, optimizer state, batch)",
           f"  temporaries  {gib(rep['temporaries'])}",
           f"  output       {gib(rep['output'])}  ({gib(rep['aliased'])} of it reuses the donated "
           "arguments)",
           f"  total        {gib(rep['total'])}"]
  mem = rep["device_memory"]
  if mem:
    verdict = "fits" if rep["total"] <= mem else "does not fit"
    lines.append(f"  device       {gib(mem)}: {verdict} ({100 * rep['total'] / mem:.0f}% of it)")
  else:
    lines.append("  device       memory unknown (set --device_memory_gb to compare)")
  return "\n".join(lines)


class Diverged(RuntimeError):
  """Training stopped: the loss stayed NaN/inf for ``max_nonfinite_logs`` logged steps."""


def train(config, workdir: str, prepared=None) -> dict:
  """Train (or resume) the run in ``workdir``; returns the last logged record. ``prepared``:
  the result of ``prepare_train(config)`` when the caller already validated the inputs."""
  model_cfg, mesh, data_iter, eval_src, init_from = prepared or prepare_train(config, workdir)
  main = jax.process_index() == 0

  s = build_step(config, model_cfg, mesh)
  graphdef, abs_params, p_sh, tx, abs_opt, o_sh, repl, b_sh = (
      s.graphdef, s.abs_params, s.p_sh, s.tx, s.abs_opt, s.o_sh, s.repl, s.b_sh)

  os.makedirs(workdir, exist_ok=True)
  mngr = checkpointing.make_manager(workdir, config.keep_checkpoints,
                                    config.async_checkpointing)
  abs_state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
               "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)}
  restored = checkpointing.restore_latest(
      mngr, abstract_params=_abstract(abs_params, p_sh), abstract_opt_state=_abstract(abs_opt, o_sh),
      abstract_state=abs_state, data_iter=data_iter)
  if restored is None:
    step = 0
    if init_from:
      params = finetune.init_params(init_from, _abstract(abs_params, p_sh))
      if main:
        print(f"fine-tuning from {init_from}: its parameters, a fresh optimizer, step 0"
              + (f", frozen: {config.freeze}" if config.freeze else ""), flush=True)
    else:
      params = init_params(model_cfg, config.seed, p_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    rng = jax.jit(lambda: jax.random.key_data(jax.random.key(config.seed)).astype(jnp.uint32),
                  out_shardings=repl)()  # a global array: every process saves the same key
    logging.info("starting a new run in %s", workdir)
  else:
    step, params, opt_state, state = restored
    rng = state["rng"]
    if main:
      print(f"resuming from checkpoint step {step} in {checkpointing.checkpoint_dir(workdir)}",
            flush=True)

  step_fn, abs_batch = s.step_fn, s.abs_batch
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, mesh=mesh,
                                      context_modes=dict(config.context_parallel)),
                    in_shardings=(p_sh, b_sh), out_shardings=repl)
  compiled = step_fn.lower(params, opt_state, abs_batch).compile()  # keep compile out of tokens/s

  schedule = learning_rate_schedule(config.optimizer, config.num_steps)
  writer = metrics_lib.MetricWriter(workdir, main, resume_step=step, config=config)
  fpt = flops_per_token(model_cfg, config.seq_len)
  peak = metrics_lib.peak_flops_per_device(config.peak_flops, model_cfg.dtype) * jax.device_count()
  tokens_per_step = config.batch_size * config.seq_len

  make_state = jax.jit(lambda at, key: {"step": at.astype(jnp.int32), "rng": key},
                       out_shardings=repl)

  def save(at):
    checkpointing.save(mngr, at, params=params, opt_state=opt_state,
                       state=make_state(np.int32(at), rng), data_iter=data_iter,
                       model_cfg=model_cfg.to_dict(), train_cfg=config.to_dict())

  record: dict = {}
  pending: list = []
  nonfinite = 0  # logged losses in a row that are NaN/inf
  if step >= config.num_steps and main:
    print(f"the run in {workdir} is complete: step {step} of num_steps {config.num_steps}")
  if main:
    print(f"model {config.preset}: {sum(x.size for x in jax.tree.leaves(abs_params)):,} params, "
          f"{model_cfg.dtype} compute; data: {len(eval_src)} held-out windows of {config.seq_len} "
          f"tokens; batch {config.batch_size}; mesh {dict(mesh.shape)} on "
          f"{jax.device_count()} {jax.default_backend()} device(s)", flush=True)
  bar = tqdm(total=config.num_steps, initial=step, disable=not main, desc="train",
             dynamic_ncols=True)
  t0, t0_step = time.perf_counter(), step
  while step < config.num_steps:
    batch = mesh_lib.global_batch(mesh, next(data_iter))
    params, opt_state, m = compiled(params, opt_state, batch)
    pending.append(m)  # device arrays: no sync until the next log step
    step += 1
    bar.update(1)
    logged = step % config.log_every == 0 or step == config.num_steps
    evaluated = config.eval_every and (step % config.eval_every == 0 or step == config.num_steps)
    if logged:  # loss and grad_norm: means over the steps since the last log
      m = {k: float(np.mean([float(x[k]) for x in jax.device_get(pending)])) for k in pending[0]}
      pending = []
      elapsed = time.perf_counter() - t0
      tps = (step - t0_step) * tokens_per_step / elapsed
      nonfinite = 0 if math.isfinite(m["loss"]) else nonfinite + 1
      record = {"step": step, "loss": m["loss"],
                "bits_per_byte": metrics_lib.bits_per_byte(m["loss"]),
                "lr": float(schedule(step - 1)), "grad_norm": m["grad_norm"],
                "tokens_per_s": tps, "mfu": tps * fpt / peak}
    if evaluated and len(eval_src):
      ev = run_eval(eval_fn, params, mesh, eval_src, config.batch_size, config.eval_batches)
      ev_record = {"eval_loss": ev["loss"], "eval_bits_per_byte": ev["bits_per_byte"]}
      record = {**record, **ev_record} if logged else {"step": step, **ev_record}
    if logged or evaluated:
      writer.write(record)
      bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")
      if main:
        bar.write(metrics_lib.format_record(record))
    if config.max_nonfinite_logs and nonfinite >= config.max_nonfinite_logs:
      bar.close()
      mngr.wait_until_finished()
      mngr.close()
      writer.close()
      last = mngr.latest_step()
      kept = ("no checkpoint was written" if last is None else
              f"the last checkpoint, step {last}, is kept")
      raise Diverged(
          f"the loss was not finite at the last {nonfinite} logged steps (step {step}); "
          f"stopping: checkpoints of diverged steps are not written, {kept}. Lower "
          f"optimizer.learning_rate or check the data (max_nonfinite_logs sets the patience)")
    if config.checkpoint_every and (step % config.checkpoint_every == 0 or
                                    step == config.num_steps) and not nonfinite:
      save(step)
    if logged or evaluated:  # eval and the (blocking part of) saving stay out of tokens/s
      t0, t0_step = time.perf_counter(), step
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  return record
