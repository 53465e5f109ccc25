"""Fine-tuning: ``--config.init_from`` starts from a converted Evo 2 checkpoint (the golden
``vortex_tiny`` fixture) with a fresh optimizer at step 0; ``--config.freeze`` keeps groups fixed."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from sh2_jax.checkpoint import load_model, save_model
from sh2_jax.convert.vortex import config_from_yaml, from_vortex, read_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "vortex_tiny")
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
SEQ = 32
CONFIG = f'''
import ml_collections
from sh2_jax.configs.base import make_config
from sh2_jax.convert.vortex import config_from_yaml, read_yaml


def get_config():
  c = make_config("tiny")
  model = config_from_yaml(read_yaml({os.path.join(FIX, "config.yml")!r})).to_dict()
  model["mr_decay"] = "weak"  # what a training config says; init_from takes 'none' from the weights
  c.model = ml_collections.ConfigDict(model)
  c.seq_len = {SEQ}
  c.eval_every = 0
  c.checkpoint_every = 0
  c.log_every = 1
  return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A converted checkpoint, the config file and a corpus of exactly one batch of windows."""
  from sh2_jax.data import pipeline
  tmp = tmp_path_factory.mktemp("finetune")
  save_model(str(tmp / "evo2"), from_vortex(os.path.join(FIX, "state_dict.pt"),
                                            os.path.join(FIX, "config.yml")))
  (tmp / "cfg.py").write_text(CONFIG)
  rng = np.random.default_rng(0)
  (tmp / "corpus.fa").write_text(">a\n" + "".join(rng.choice(list("ACGT"), 6 * SEQ)) + "\n")
  data = ml_collections.ConfigDict(dict(path=str(tmp / "corpus.fa"), format="auto",
                                        eval_fraction=0.0, upper_case=False, n_handling="keep"))
  windows = len(pipeline.load_dataset(data, SEQ)[0])
  assert windows >= 4
  return tmp, windows


def _run(tmp, *args):
  r = subprocess.run([sys.executable, "train.py", f"--config={tmp / 'cfg.py'}",
                      f"--config.data.path={tmp / 'corpus.fa'}", *args], cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=600)
  return r


def test_first_step_loss_is_the_checkpoints_eval_loss_and_frozen_groups_stay(setup, capsys):
  tmp, n = setup
  ev = _run(tmp, "--mode=eval", f"--workdir={tmp / 'evo2'}", f"--config.batch_size={n}",
            "--config.data.eval_fraction=1.0", "--config.eval_batches=0")
  assert ev.returncode == 0, ev.stderr[-2000:]
  eval_loss = json.loads(ev.stdout.strip().splitlines()[-1])["loss"]

  work = tmp / "run"
  tr = _run(tmp, f"--workdir={work}", f"--config.init_from={tmp / 'evo2'}",
            "--config.freeze=embedding_layer,blocks.0", f"--config.batch_size={n}",
            "--config.data.eval_fraction=0.0", "--config.num_steps=2",
            "--config.checkpoint_every=2", "--config.optimizer.warmup_steps=0")
  assert tr.returncode == 0, tr.stderr[-2000:]
  assert "init_from: model.mr_decay 'none' from the checkpoint (the config says 'weak')" in tr.stdout
  assert "fine-tuning from" in tr.stdout and "step 0" in tr.stdout
  records = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2]
  # The whole corpus is one batch: step 1's loss is the checkpoint's loss on the same windows.
  assert records[0]["loss"] == pytest.approx(eval_loss, rel=1e-5)
  assert records[1]["loss"] < records[0]["loss"]  # and it trains

  before = load_model(str(tmp / "evo2"))
  after = load_model(str(work))
  assert after.cfg.mr_decay == "none"
  np.testing.assert_array_equal(np.asarray(after.embedding_layer.weight[...]),
                                np.asarray(before.embedding_layer.weight[...]))
  for a, b in zip(_leaves(after.blocks[0]), _leaves(before.blocks[0])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(after.blocks[1]),
                                                       _leaves(before.blocks[1])))

  # The workdir now holds checkpoints: the same command resumes from them, init_from unread.
  from sh2_jax.train import trainer
  cfg = _config(tmp, init_from=str(tmp / "evo2"), freeze="embedding_layer")
  model_cfg, *_, init_from = trainer.prepare_train(cfg, str(work))
  assert init_from is None and model_cfg.mr_decay == "none"  # as the run's checkpoints say
  assert "resuming from them; init_from" in capsys.readouterr().out
  with pytest.raises(ValueError, match="freeze: checkpoint 'embedding_layer,blocks.0', config ''"):
    trainer.prepare_train(_config(tmp, init_from=str(tmp / "evo2")), str(work))


def _leaves(module):
  import jax
  from flax import nnx
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def _config(tmp, **over):
  import runpy
  c = runpy.run_path(str(tmp / "cfg.py"))["get_config"]()
  c.data.path = str(tmp / "corpus.fa")
  c.data.eval_fraction = 0.0
  c.batch_size = 2
  for k, v in over.items():
    node = c
    *head, last = k.split(".")
    for h in head:
      node = node[h]
    node[last] = v
  return c


def test_bad_init_from_and_freeze_are_input_errors(setup, tmp_path):
  from sh2_jax.train import trainer
  tmp, _ = setup
  evo2 = str(tmp / "evo2")
  with pytest.raises(ValueError, match=r"init_from .* holds another model: model.mlp_hidden: "
                     r"checkpoint 128, config 96"):
    trainer.prepare_train(_config(tmp, init_from=evo2, **{"model.mlp_hidden": 96}),
                          str(tmp_path / "w"))
  with pytest.raises(ValueError, match="init_from '/nope' does not exist"):
    trainer.prepare_train(_config(tmp, init_from="/nope"), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="init_from: no sh2_jax checkpoint found"):
    trainer.prepare_train(_config(tmp, init_from=str(tmp_path)), str(tmp_path / "w"))
  with pytest.raises(ValueError, match=r"freeze group 'blocks.99' names no parameter.*"
                     r"blocks.0 .. blocks.7"):
    trainer.prepare_train(_config(tmp, freeze="blocks.99"), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="freezes every parameter"):
    trainer.prepare_train(_config(tmp, freeze="embedding_layer,blocks,norm"), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_cli_init_from_another_model_is_one_line(setup, tmp_path):
  tmp, _ = setup
  r = _run(tmp, f"--workdir={tmp_path / 'w'}", f"--config.init_from={tmp / 'evo2'}",
           "--config.model.mlp_hidden=96")
  assert r.returncode == 2
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: init_from ") and "mlp_hidden" in lines[0]
  assert not (tmp_path / "w").exists()


def test_init_from_restores_into_fsdp_shards(setup, tmp_path):
  """Two devices, parameters sharded over fsdp: each restores its shard of the checkpoint."""
  tmp, _ = setup
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  r = subprocess.run([sys.executable, "train.py", f"--config={tmp / 'cfg.py'}",
                      f"--config.data.path={tmp / 'corpus.fa'}", f"--workdir={tmp_path / 'w'}",
                      f"--config.init_from={tmp / 'evo2'}", "--config.mesh.data=1",
                      "--config.mesh.fsdp=2", "--config.batch_size=2", "--config.num_steps=1",
                      "--config.data.eval_fraction=0.0"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "fine-tuning from" in r.stdout and "on 2 cpu device(s)" in r.stdout
