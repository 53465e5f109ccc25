"""Damaged checkpoints (``sh2_jax/checkpoint.py``): truncated, overwritten or mismatched files
are one ValueError naming the checkpoint — in ``load_model`` and in the commands that load one
(``sh2-train --mode=eval``, ``sh2-generate``: exit 2, one ``error:`` line) — never a traceback,
never Orbax's "Event loop is closed" noise, never silently wrong weights."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sh2_jax import checkpoint
from sh2_jax.model import StripedHyena
from sh2_jax.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  model = StripedHyena(get_preset("tiny"), rngs=nnx.Rngs(0))
  checkpoint.save_model(path, model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with open(os.path.join(path, "checksums.json"), "w") as f:  # kept aside; some cases add it
    json.dump(checkpoint.checksums({"params": params}), f)
  return path


def _data_file(path):
  folder = os.path.join(path, "params", "d")
  return max((os.path.join(folder, n) for n in os.listdir(folder)), key=os.path.getsize)


def _truncate(path):
  with open(_data_file(path), "r+b") as f:
    f.truncate(100)


def _random_bytes(path):
  target = _data_file(path)
  size = os.path.getsize(target)
  open(target, "wb").write(np.random.default_rng(0).bytes(size))


def _edit_config(**fields):
  def edit(path):
    meta = os.path.join(path, "config", "metadata")
    cfg = json.load(open(meta))
    json.dump({**cfg, **fields}, open(meta, "w"))
  return edit


def _junk_config(path):
  open(os.path.join(path, "config", "metadata"), "w").write("garbage{")


def _no_metadata(path):
  os.remove(os.path.join(path, "params", "_METADATA"))


def _altered_checksum(path):
  sums = json.load(open(os.path.join(path, "checksums.json")))
  key = sorted(sums)[3]
  sums[key][0] += 1
  os.makedirs(os.path.join(path, "checksums"))
  json.dump(sums, open(os.path.join(path, "checksums", "metadata"), "w"))


DAMAGE = [
    (_truncate, "its parameters cannot be read .*OUT_OF_RANGE"),
    (_random_bytes, "its parameters cannot be read"),
    (_edit_config(d_model=64), r"its parameters do not fit the model its config describes "
     r"\(41 differ: .* has shape \(384, 3\), the model \(192, 3\)"),
    (_edit_config(num_layers=-3), "its stored model config is not valid .*num_layers -3"),
    (_junk_config, "its model config cannot be read .*JSONDecodeError"),
    (_no_metadata, "its parameters cannot be read .*_METADATA"),
    (_altered_checksum, r"checksum mismatch in 1 arrays \(\['params'\]"),
]


@pytest.mark.parametrize("damage,message", DAMAGE, ids=[d.__name__ for d, _ in DAMAGE])
def test_load_model_names_the_damaged_checkpoint(saved, tmp_path, capfd, damage, message):
  path = str(tmp_path / "ckpt")
  shutil.copytree(saved, path)
  damage(path)
  with pytest.raises(ValueError, match=f"^checkpoint '{path}': .*{message}"):
    checkpoint.load_model(path)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]


def test_intact_checksums_load(saved, tmp_path):
  path = str(tmp_path / "ckpt")
  shutil.copytree(saved, path)
  os.makedirs(os.path.join(path, "checksums"))
  shutil.copy(os.path.join(path, "checksums.json"), os.path.join(path, "checksums", "metadata"))
  assert checkpoint.load_model(path).cfg.d_model == 128


def _run(args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=ENV, timeout=300)


def test_commands_report_a_damaged_checkpoint_in_one_line(saved, tmp_path):
  """Eval of a checkpoint overwritten with random bytes, generation from it and fine-tuning from
  it: exit 2, the same one line naming the checkpoint, nothing written."""
  path = str(tmp_path / "ckpt")
  shutil.copytree(saved, path)
  _random_bytes(path)
  before = sorted(os.listdir(tmp_path))
  commands = [["train.py", "--config=tiny", f"--workdir={path}", "--mode=eval"],
              ["generate.py", f"--model={path}", "--prompt=ACGT"],
              ["train.py", "--config=tiny", f"--workdir={tmp_path / 'run'}",
               f"--config.init_from={path}"]]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(_run, commands))
  for (args, r), prefix in zip(zip(commands, results), ["", "", "init_from: "]):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "eval:" not in ln]
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {prefix}checkpoint '{path}': its parameters cannot be read"), (args, lines[-5:])
  assert sorted(os.listdir(tmp_path)) == before


def test_fine_tuning_from_altered_arrays_is_one_error(saved, tmp_path):
  """init_from a checkpoint whose arrays fail their checksums (found when they are read, once
  training has started): one ``error:`` line, exit 2."""
  path = str(tmp_path / "ckpt")
  shutil.copytree(saved, path)
  _altered_checksum(path)
  args = ["train.py", "--config=tiny", f"--workdir={tmp_path / 'run'}",
          f"--config.init_from={path}", "--config.num_steps=1"]
  r = _run(args)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(
      f"error: init_from: checkpoint '{path}': checksum mismatch in 1 arrays"), lines[-5:]
