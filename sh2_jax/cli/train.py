"""Train or evaluate a StripedHyena 2 model (``sh2-train``; ``python train.py`` in a checkout).

  sh2-train --config=tiny --workdir=runs/tiny [--config.key=value ...]
  sh2-train --config=tiny --workdir=runs/tiny --mode=eval
  sh2-train --config=evo2_7b --dry_run          # model summary, nothing written
  sh2-train --config=my_config.py --workdir=W   # any ml_collections config file

``--config`` is a config file or the name of one shipped in ``sh2_jax/configs/`` (a preset:
``tiny``, ``evo2_7b``, ...). Restarting the same command resumes from the latest complete
checkpoint in ``WORKDIR/checkpoints``. In eval mode ``--workdir`` may also be a step directory
or a converted checkpoint.

Multi-host: every process runs the same command plus
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or ``--distributed`` to
let JAX detect a SLURM / TPU / MPI cluster). ``config.mesh`` then spans the devices of all
processes and ``batch_size`` is the global batch.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import sys

from absl import flags, logging
from ml_collections import config_flags

from sh2_jax.cli.launch import fail, launch, one_line

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/tiny.py) or the name "
                                "of a shipped config (tiny, evo2_7b, ...).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, tensorboard/); "
                    "in eval mode, the checkpoint to evaluate.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (or resume), or evaluate.")
flags.DEFINE_bool("dry_run", False, "Print the model summary and exit; writes nothing.")
flags.DEFINE_bool("memory", False, "Compile the train step for the config's model, batch, length "
                  "and mesh, print XLA's memory per device against the device's, and exit; writes "
                  "nothing (plan on forced host devices with XLA_FLAGS="
                  "--xla_force_host_platform_device_count=N).")
flags.DEFINE_float("device_memory_gb", None, "With --memory: compare against this many GiB per "
                   "device instead of the device's own memory.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                  "auto-detection (SLURM, TPU pods, Open MPI).")


def _initialize_distributed() -> None:
  import jax
  address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num = FLAGS.num_processes if FLAGS.num_processes is not None else int(
        os.environ["JAX_NUM_PROCESSES"])
    pid = FLAGS.process_id if FLAGS.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif FLAGS.distributed:
    jax.distributed.initialize()


def _override_error(argv: list[str], error: Exception) -> str:
  """A one-line message for a failed ``--config.key=value`` override (ml_collections raises a
  bare KeyError/AttributeError naming only the last key)."""
  import runpy
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    config = runpy.run_path(path)["get_config"]() if path else None
  except Exception:  # noqa: BLE001 - the file itself is broken: report the original error
    config = None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(keys):
      if node is None or not hasattr(node, "keys"):
        break
      if key not in node:
        where = ".".join(keys[:depth]) or "the top level"
        return (f"unknown config key {'.'.join(keys)!r} (from {arg}); valid keys at {where}: "
                f"{', '.join(sorted(node.keys()))}")
      node = node[key]
  return f"bad --config override: {type(error).__name__}: {error}"


def shipped_configs() -> dict[str, str]:
  """Name -> path of every config file shipped in ``sh2_jax/configs/`` (one per preset)."""
  folder = importlib.resources.files("sh2_jax.configs")
  return {f.name[:-3]: str(f) for f in sorted(folder.iterdir(), key=lambda f: f.name)
          if f.name.endswith(".py") and f.name not in ("__init__.py", "base.py")}


def resolve_config_arg(argv: list[str]) -> list[str]:
  """``--config=NAME`` (or ``--config NAME``) of a shipped config -> ``--config=<its file>``;
  a value that is neither an existing file nor a shipped name (a bare word without ``/`` or
  ``.py``) is an error listing the shipped names. A ``:arg`` suffix is kept."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      value, at = arg[len("--config="):], i
    elif arg == "--config" and i + 1 < len(out):
      value, at = out[i + 1], i + 1
    else:
      continue
    name, sep, rest = value.partition(":")
    if os.path.exists(name) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
      continue  # a file (ml_collections reports a missing one)
    shipped = shipped_configs()
    if name not in shipped:
      fail(f"--config {value!r} is neither a config file nor a shipped config; shipped: "
           f"{', '.join(shipped)}")
    out[at] = (arg[:len("--config=")] if at == i else "") + shipped[name] + sep + rest
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  argv = resolve_config_arg(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:  # absl's own messages are clear (unknown flag, bad enum value)
    fail(one_line(str(e)))
  except Exception as e:  # noqa: BLE001 - config file or override errors
    fail(_override_error(argv, e))


def _check_without_data(config, mode: str, memory: bool = True):
  """What ``--dry_run`` and ``--memory`` check (everything but the data and the workdir): the
  config, the mesh and the model on it (``memory``: against the device's memory too).
  Returns (model_cfg, mesh shape)."""
  from sh2_jax import checks
  from sh2_jax.train import check
  from sh2_jax.train import mesh as mesh_lib
  import jax
  model_cfg = check.validate(config, mode)
  shape = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(config.mesh, jax.device_count())))
  check.check_against_mesh(config, shape, jax.process_count())
  if memory:
    check.check_model(config, model_cfg, shape, training=mode == "train")
  else:
    checks.fsdp(*checks.abstract_params(model_cfg), shape)
  return model_cfg, shape


def _dry_run(config) -> None:
  """The summary of the config's model, then whether its parameters (and optimizer state, in
  train mode) fit one device of this machine: a verdict line, not a refusal (a dry run plans;
  a run on a device too small is refused before it starts)."""
  import jax

  from sh2_jax import checks
  from sh2_jax.summary import print_summary
  try:
    model_cfg, shape = _check_without_data(config, FLAGS.mode, memory=False)
    checks.backend(model_cfg)
  except ValueError as e:
    fail(str(e))
  print_summary(config)
  params, specs = checks.abstract_params(model_cfg)
  opt = None
  if FLAGS.mode == "train":
    from sh2_jax.train.optim import freeze_prefixes, make_optimizer
    tx = make_optimizer(config.optimizer, config.num_steps, freeze_prefixes(config.freeze))
    opt = jax.eval_shape(tx.init, params)
  need = checks.memory(params, specs, shape, opt, limit=2**62)  # measured, never refused here
  limit, where = checks.device_memory()
  what = "parameters + optimizer state" if FLAGS.mode == "train" else "parameters"
  verdict = ""
  if limit:
    verdict = (f" of {checks.gib(limit)} ({where}): "
               + ("fits" if need <= limit else "does not fit (a run here is refused)"))
  print(f"{what} per device on mesh {shape}: {checks.gib(need)}{verdict}")


def _memory_report(config) -> None:
  from sh2_jax.train import trainer
  from sh2_jax.train import mesh as mesh_lib
  import jax
  try:
    model_cfg, _ = _check_without_data(config, "train", memory=False)  # reported, not refused
    mesh = mesh_lib.make_mesh(config.mesh)
    if FLAGS.device_memory_gb is not None and not FLAGS.device_memory_gb > 0:
      raise ValueError(f"--device_memory_gb {FLAGS.device_memory_gb} must be > 0")
  except ValueError as e:
    fail(str(e))
  limit = FLAGS.device_memory_gb * 2**30 if FLAGS.device_memory_gb else None
  rep = trainer.memory_report(config, model_cfg, mesh, limit)
  print(f"model {config.preset}, batch {config.batch_size} x {config.seq_len} tokens, remat "
        f"{config.remat}, {jax.default_backend()}")
  print(trainer.format_memory_report(rep))


def run(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config is None:
    fail("--config is required, e.g. --config=tiny or --config=path/to/config.py")
  try:
    config.keys()  # the config file loads lazily: a missing or broken one fails here
  except Exception as e:  # noqa: BLE001 - report the loader's own last line
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    fail(f"cannot load the --config file: {lines[-1] if lines else type(e).__name__}")
  if FLAGS.dry_run:
    _dry_run(config)
    return
  if FLAGS.memory:
    _memory_report(config)
    return
  if not FLAGS.workdir:
    fail("--workdir is required")
  _initialize_distributed()
  import jax
  logging.info("JAX process %d of %d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.default_backend())
  from sh2_jax.train import evaluate, trainer
  try:  # every check of the inputs runs here, before anything is written
    if FLAGS.mode == "train":
      prepared = trainer.prepare_train(config, FLAGS.workdir)
    else:
      prepared = evaluate.prepare_eval(config, FLAGS.workdir)
  except ValueError as e:  # bad input: one clear line, no traceback
    fail(str(e))
  if FLAGS.mode == "train":
    from sh2_jax.checkpoint import DamagedCheckpoint
    try:
      trainer.train(config, FLAGS.workdir, prepared)
    except trainer.Diverged as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    except DamagedCheckpoint as e:  # init_from's arrays, read once training starts
      fail(f"init_from: {e}")
  else:
    evaluate.evaluate(config, FLAGS.workdir, prepared)


def main() -> None:
  """The ``sh2-train`` command."""
  launch(run, __name__, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
