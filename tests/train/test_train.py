"""Trainer pieces in-process (optimizer mask, schedule, gradient accumulation, remat) and
every bad-input case of train.py: one clear error line, exit status 2, nothing written."""

import concurrent.futures
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sh2_jax.configs.base import make_config
from sh2_jax.model import StripedHyena
from sh2_jax.presets import get_preset
from sh2_jax.train import check, mesh as mesh_lib, optim
from sh2_jax.train.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = get_preset("tiny", d_model=32, mlp_hidden=64, num_heads=2, se_groups=4, mr_groups=4,
                   mr_len=16)


def _params():
  return nnx.split(StripedHyena(SMALL, rngs=nnx.Rngs(0)))


def test_decay_mask_covers_matrices_only():
  _, state = _params()
  mask = optim.decay_mask(nnx.to_pure_dict(state))
  flat = {".".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, v in flat.items() if v)
  assert "embedding_layer.weight" in decayed
  assert all(k.endswith(".kernel") or k == "embedding_layer.weight" for k in decayed)
  for name in ("blocks.0.filter.h", "blocks.0.filter.short_filter_weight", "blocks.1.filter.D",
               "blocks.2.filter.log_rates", "blocks.2.filter.residues", "blocks.0.pre_norm.scale",
               "blocks.0.out_filter_dense.bias", "blocks.3.inner_mha_cls.out_proj.bias", "norm.scale"):
    assert flat[name] is False, name
  assert flat["blocks.3.inner_mha_cls.Wqkv.kernel"] and flat["blocks.0.mlp.l3.kernel"]
  no_emb = optim.decay_mask(nnx.to_pure_dict(state), decay_embedding=False)
  assert not no_emb["embedding_layer"]["weight"]


def test_schedule_warmup_then_cosine():
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1))
  s = optim.learning_rate_schedule(cfg, 100)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-3)
  assert float(s(100)) == pytest.approx(1e-4) and float(s(50)) < 1e-3


def _batch(rng, b=4, length=24):
  tokens = rng.integers(2, 256, size=(b, length + 1)).astype(np.int32)
  w = np.ones((b, length), np.float32)
  w[-1, -5:] = 0.0  # padding must not count
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": w}


def test_grad_accumulation_and_remat_match_one_big_step():
  graphdef, state = _params()
  params = nnx.to_pure_dict(state)
  opt_cfg = make_config("tiny").optimizer
  opt_cfg.warmup_steps = 0  # the first update must move the weights
  tx = optim.make_optimizer(opt_cfg, 10)
  batch = _batch(np.random.default_rng(0))
  outs = {}
  for name, remat, accum in (("base", "none", 1), ("accum_remat", "blocks", 2),
                             ("dots", "dots", 1)):
    fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, remat=remat,
                                   accum=accum, mesh=None))
    outs[name] = fn(params, tx.init(params), batch)
  base_p, _, base_m = outs["base"]
  assert float(base_m["tokens"]) == 4 * 24 - 5
  for name in ("accum_remat", "dots"):
    p, _, m = outs[name]
    np.testing.assert_allclose(float(m["loss"]), float(base_m["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), float(base_m["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base_p)):
      # Adam's first step is ~lr * sign(g): allow 1e-5 (0.3% of a step) where g is ~0.
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The update moved the weights: the comparison above is not between untouched copies.
  assert not np.allclose(base_p["norm"]["scale"], params["norm"]["scale"])


def test_mesh_shape_and_batch_checks():
  m = ml_collections.ConfigDict(dict(data=-1, fsdp=2, context=1))
  assert mesh_lib.mesh_shape(m, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match=r"mesh \{'data': 3, 'fsdp': 1, 'context': 1\} needs 3 "
                                       r"devices but 8 are available"):
    mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=1, context=1)), 8)
  with pytest.raises(ValueError, match="3 does not divide 8"):
    mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=3, context=1)), 8)
  with pytest.raises(ValueError, match="more than one axis set to -1"):
    mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=-1, context=1)), 8)
  cfg = make_config("tiny")
  cfg.batch_size = 6
  with pytest.raises(ValueError, match=r"batch_size 6 is not divisible by the data axes of the "
                                       r"mesh: data 4 x fsdp 1 = 4"):
    check.check_against_mesh(cfg, {"data": 4, "fsdp": 1, "context": 1}, 1)
  cfg.batch_size, cfg.optimizer.grad_accum_steps = 8, 2
  with pytest.raises(ValueError, match=r"the microbatch 4 .* not divisible .* = 8"):
    check.check_against_mesh(cfg, {"data": 4, "fsdp": 2, "context": 1}, 1)
  cfg.optimizer.grad_accum_steps = 1
  with pytest.raises(ValueError, match="seq_len 128 cannot be split over mesh.context 3: it must "
                                       r"be a multiple of 6 \(zig-zag"):
    check.check_against_mesh(cfg, {"data": 1, "fsdp": 1, "context": 3}, 1)
  cfg.seq_len = 130  # even, but not a multiple of 2 chunks x 2 ranks
  with pytest.raises(ValueError, match="seq_len 130 cannot be split over mesh.context 2"):
    check.check_against_mesh(cfg, {"data": 1, "fsdp": 1, "context": 2}, 1)
  cfg.seq_len = 132
  check.check_against_mesh(cfg, {"data": 1, "fsdp": 1, "context": 2}, 1)


def test_validate_names_bad_values():
  cfg = make_config("tiny")
  check.validate(cfg)
  for key, value, msg in (("num_steps", 0, "num_steps 0 is not valid"),
                          ("remat", "all", "remat 'all' is not valid; expected one of none"),
                          ("batch_size", 7, None)):
    bad = make_config("tiny")
    bad[key] = value
    if msg is None:
      bad.optimizer.grad_accum_steps = 2
      msg = "batch_size 7 is not divisible by optimizer.grad_accum_steps 2"
    with pytest.raises(ValueError, match=msg):
      check.validate(bad)
  bad = make_config("tiny")
  bad.context_parallel.li_mode = "fft"
  with pytest.raises(ValueError, match=r"context li_mode 'fft' is not one of a2a, p2p_fft, "
                                       r"state \(config.context_parallel\)"):
    check.validate(bad)
  bad = make_config("tiny")
  bad.model.num_heads = 3
  with pytest.raises(ValueError, match="num_heads 3 is not valid"):
    check.validate(bad)
  bad = ml_collections.ConfigDict(make_config("tiny").to_dict())
  bad.data.shuffle = True  # an unknown key written into a config file
  with pytest.raises(ValueError, match="unknown config key 'data.shuffle'"):
    check.validate(bad)


def _run_cli(args, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # other modules set it
  env.update({"JAX_PLATFORMS": "cpu", **(env_extra or {})})
  return subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_bad_inputs_give_one_clear_error_and_write_nothing(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "headers.fa").write_bytes(b">only a header\n")
  (tmp_path / "notes.csv").write_bytes(b"a,b\n")
  two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  cases = [
      (["--config.foo=1"], None, "unknown config key 'foo'"),
      (["--config.model.foo=1"], None, "unknown config key 'model.foo'"),
      (["--config.mesh.data=3"], None, "mesh {'data': 3, 'fsdp': 1, 'context': 1} needs 3 "
                                       "devices but 1 are available"),
      (["--config.batch_size=3"], two, "batch_size 3 is not divisible by the data axes of the "
                                       "mesh: data 2 x fsdp 1 = 2"),
      ([f"--config.data.path={tmp_path / 'missing'}"], None, "does not exist"),
      ([f"--config.data.path={tmp_path / 'empty.txt'}"], None, "empty.txt' is empty"),
      ([f"--config.data.path={tmp_path / 'headers.fa'}"], None, "has no sequences"),
      ([f"--config.data.path={tmp_path / 'notes.csv'}"], None,
       "notes.csv' has an unknown extension; expected one of .txt, .text, .fa"),
      (["--config.model.num_heads=3"], None, "num_heads 3 is not valid"),
  ]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(_run_cli, [f"--workdir={tmp_path / f'w{i}'}", *args], env)
               for i, (args, env, _) in enumerate(cases)]
    for i, (fut, (args, _, msg)) in enumerate(zip(futures, cases)):
      r = fut.result()
      assert r.returncode == 2, (args, r.stderr[-2000:])
      lines = [l for l in r.stderr.splitlines() if l.strip()]
      assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, lines)
      assert "Traceback" not in r.stderr
      assert not (tmp_path / f"w{i}").exists(), args


def test_eval_of_a_saved_model_checkpoint(tmp_path, capsys):
  """--mode=eval reads checkpoints written by ``save_model`` (the converter's format)."""
  from sh2_jax.checkpoint import save_model
  from sh2_jax.train.evaluate import evaluate
  save_model(str(tmp_path / "ckpt"), StripedHyena(SMALL, rngs=nnx.Rngs(1)))
  (tmp_path / "text.txt").write_bytes(b"A short evaluation text, evaluated whole. " * 6)
  cfg = make_config("tiny")
  cfg.data.path, cfg.data.eval_fraction = str(tmp_path / "text.txt"), 1.0
  cfg.seq_len, cfg.batch_size, cfg.eval_batches = 32, 4 * jax.device_count(), 0
  summary = evaluate(cfg, str(tmp_path / "ckpt"))
  assert summary["tokens"] == 6 * 42  # every byte and the EOD are targets, nothing else
  assert summary["windows"] == 8
  assert abs(summary["loss"] - np.log(512)) < 0.5  # an untrained model: near uniform
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == summary["loss"]
  with pytest.raises(ValueError, match="no sh2_jax checkpoint found"):
    evaluate(cfg, str(tmp_path))


def test_metric_writer_resume_drops_later_and_torn_records(tmp_path):
  from sh2_jax.train.metrics import MetricWriter
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
  w = MetricWriter(str(tmp_path), enabled=True, resume_step=2)
  w.write({"step": 3, "loss": 1.5})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                            {"step": 3, "loss": 1.5}]
  assert os.listdir(tmp_path / "tensorboard")


def test_tensorboard_tags_and_logged_config():
  """Scalars under train/ and eval/ (TensorBoard sections); the config as flat HParams (the
  event files themselves are read in tests/test_install.py)."""
  from sh2_jax.train.metrics import flat_hparams, tensorboard_tag
  assert [tensorboard_tag(k) for k in ("loss", "lr", "eval_loss", "eval_bits_per_byte")] == [
      "train/loss", "train/lr", "eval/loss", "eval/bits_per_byte"]
  hp = flat_hparams(make_config("tiny").to_dict())
  assert hp["optimizer.learning_rate"] == 3e-3 and hp["model.layout"] == "SE-MR-LI-MHA"
  assert hp["async_checkpointing"] is True and hp["mesh.data"] == -1
  assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())


def test_param_sharding_over_fsdp_and_context_names_the_bad_dimension():
  """Parameters shard over fsdp x context (mesh.FSDP_AXES); a dimension that product does not
  divide is one error naming the parameter and both axes."""
  from flax import nnx
  from sh2_jax import ModelConfig, StripedHyena
  from sh2_jax.train import mesh as mesh_lib
  cfg = ModelConfig(d_model=32, num_layers=1, layout="SE", num_heads=2, mlp_hidden=48,
                    se_groups=8, mr_groups=8)
  abstract = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  specs = mesh_lib.param_specs(abstract)
  assert jax.sharding.PartitionSpec(("fsdp", "context"), None) in jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  mesh = jax.sharding.AbstractMesh((1, 1, 3), mesh_lib.AXES)
  with pytest.raises(ValueError, match=r"cannot be sharded over mesh.fsdp 1 x mesh.context 3 "
                                       r"\(= 3 devices\): (\d+) is not divisible by 3; choose "
                                       r"mesh.fsdp x mesh.context dividing \1$"):
    mesh_lib.param_shardings(mesh, params, specs)
  ok = jax.sharding.AbstractMesh((1, 2, 2), mesh_lib.AXES)
  shardings = mesh_lib.param_shardings(ok, params, specs)
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(params))


def test_memory_report_before_a_run(tmp_path):
  """``--memory`` compiles the step and prints XLA's memory per device, with a verdict against
  the given device memory; on 2 forced host devices it plans a context-parallel mesh."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda *a, **kw: subprocess.run(  # noqa: E731
      [sys.executable, "train.py", "--config=configs/tiny.py", "--memory", *a],
      capture_output=True, text=True, cwd=root, timeout=600, **kw)
  r = run("--device_memory_gb=0.001", env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  for word in ("arguments", "temporaries", "output", "total", "does not fit"):
    assert word in r.stdout, r.stdout
  r = run("--device_memory_gb=64", "--config.mesh.context=2", "--config.mesh.data=1",
          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert "'context': 2" in r.stdout and ": fits" in r.stdout, r.stdout
  r = run("--device_memory_gb=-1", env=env)
  assert r.returncode == 2 and "--device_memory_gb -1.0 must be > 0" in r.stderr
  assert not list(tmp_path.iterdir())
