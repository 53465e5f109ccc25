"""Inputs that used to hang or train silently: one clear error before anything is written,
a divergence stop, and the XLA CPU deadlock worked around (``sh2_jax/__init__.py``)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}

TRAIN_DIRECT = r'''
import sys, tempfile
import sh2_jax  # noqa: F401 - the XLA CPU workaround
from sh2_jax.configs.base import make_config
from sh2_jax.config import ModelConfig
from sh2_jax.train import trainer
trainer.check.validate = lambda config, mode: ModelConfig.from_dict(config.model)  # bypass
c = make_config("tiny")
c.model.vocab_size = 100
c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 0, 0
c.max_nonfinite_logs = 0
print("finished", trainer.train(c, tempfile.mkdtemp())["step"])
'''


def test_fft_concurrency_no_longer_deadlocks():
  """The tiny model's train step with vocab_size 100 (validation bypassed) hung forever in XLA's
  CPU runtime without the workaround (2 cores); it must finish."""
  r = subprocess.run([sys.executable, "-c", TRAIN_DIRECT], capture_output=True, text=True,
                     cwd=ROOT, env={**ENV, "PYTHONPATH": ROOT}, timeout=400)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "finished 3" in r.stdout


def _train(tmp_path, *overrides, timeout=300):
  work = tmp_path / "w"
  r = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py",
                      f"--workdir={work}", *overrides], capture_output=True, text=True,
                     cwd=ROOT, env=ENV, timeout=timeout)
  return r, work


@pytest.mark.parametrize("override,message", [
    ("--config.model.vocab_size=100", "model.vocab_size 100 is below the 256 byte tokens"),
    ("--config.optimizer.grad_clip=-1.0", "optimizer.grad_clip -1.0 is not valid"),
    ("--config.seq_len=300", "seq_len 300 is more than the model's max_seqlen 256"),
    ("--config.optimizer.learning_rate=inf", "optimizer.learning_rate inf must be a finite"),
    ("--config.max_nonfinite_logs=-1", "max_nonfinite_logs -1 is not valid"),
    ("--config.model.conv_impl=pallas", "conv_impl 'pallas' needs a GPU backend"),
    ("--config.model.li_impl=modal_scan", "li_impl 'modal_scan' needs a GPU backend"),
])
def test_bad_training_values_are_one_error_and_write_nothing(tmp_path, override, message):
  r, work = _train(tmp_path, override, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], lines[-3:]
  assert "Traceback" not in r.stderr
  assert not work.exists()


def test_divergence_stops_with_a_clear_message(tmp_path):
  r, work = _train(tmp_path, "--config.optimizer.learning_rate=1e30",
                   "--config.optimizer.warmup_steps=0", "--config.num_steps=40",
                   "--config.log_every=1", "--config.eval_every=0",
                   "--config.checkpoint_every=2")
  assert r.returncode == 1, r.stderr[-2000:]
  last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
  assert last.startswith("error: the loss was not finite at the last 3 logged steps"), last
  steps = [int(line.split('"step": ')[1].split(",")[0])
           for line in open(work / "metrics.jsonl") if '"loss"' in line]
  assert max(steps) < 40
  ckpts = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  import json
  losses = {json.loads(line)["step"]: json.loads(line)["loss"]
            for line in open(work / "metrics.jsonl") if '"loss"' in line}
  assert all(losses[s] == losses[s] for s in ckpts), (ckpts, losses)  # no NaN step kept


def test_dry_run_validates(tmp_path):
  """A bad value is refused; a model whose parameters and optimizer state alone do not fit the
  device gets its summary and a "does not fit" verdict."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    bad, huge = pool.map(lambda a: _train(tmp_path, "--dry_run", a, timeout=120),
                         ["--config.seq_len=-5", "--config.model.d_model=1048576"])
  (r, work), (big, _) = bad, huge
  assert r.returncode == 2 and "error: seq_len -5 is not valid" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and not work.exists()
  # a dry run plans: the verdict is a line (a run of it is refused: test_checks)
  assert big.returncode == 0 and "parameters: 17,596,021,736,504" in big.stdout, big.stderr[-2000:]
  last = big.stdout.strip().splitlines()[-1]
  assert "192.0 TiB" in last and "does not fit (a run here is refused)" in last, last


def _ckpt_listing(work):
  root = work / "checkpoints"
  return sorted(os.listdir(root))


def test_other_model_is_an_input_error_and_bit_flips_are_damage(tmp_path):
  """A config for another model on a good workdir: exit 2 naming the fields, checkpoints left
  as they are. Flipped bits in a parameter file: the step fails to restore (TensorStore's
  CRC of the file) or its checksum, is renamed ``.damaged`` with one warning line, and the run
  resumes from the previous step."""
  base = ["--config.num_steps=4", "--config.checkpoint_every=2", "--config.log_every=2",
          "--config.eval_every=0", "--config.async_checkpointing=false"]
  r, work = _train(tmp_path, *base)
  assert r.returncode == 0, r.stderr[-2000:]
  before = _ckpt_listing(work)
  assert "2" in before and "4" in before
  r, _ = _train(tmp_path, *base, "--config.model.d_model=64", "--config.num_steps=6")
  assert r.returncode == 2, r.stderr[-2000:]
  last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
  assert last.startswith("error: the checkpoints in") and "model.d_model: checkpoint 128, " \
      "config 64" in last, last
  assert _ckpt_listing(work) == before
  data = work / "checkpoints" / "4" / "params"
  files = [os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs
           if os.path.basename(d) == "d"]
  target = max(files, key=os.path.getsize)
  blob = bytearray(open(target, "rb").read())
  for i in range(len(blob) // 3, len(blob) // 3 + 64, 8):
    blob[i] ^= 0x10
  open(target, "wb").write(bytes(blob))
  r, _ = _train(tmp_path, *base[1:], "--config.num_steps=6")
  assert r.returncode == 0, r.stderr[-2000:]
  # the fallback is one warning line: no Orbax "Event loop is closed" tracebacks, no log line
  warnings = [ln for ln in r.stderr.splitlines() if "damaged" in ln]
  assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint step 4 in "), \
      r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-2000:]
  assert "resuming from checkpoint step 2" in r.stdout
  assert "4.damaged" in _ckpt_listing(work)


def test_missing_config_file_and_eval_output_directory(tmp_path):
  r = subprocess.run([sys.executable, "train.py", f"--config={tmp_path / 'none.py'}",
                      f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, cwd=ROOT,
                     env=ENV, timeout=120)
  assert r.returncode == 2 and "error: cannot load the --config file" in r.stderr, r.stderr[-1500:]
  assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()
  r, _ = _train(tmp_path, "--mode=eval", f"--config.eval_output={tmp_path / 'no' / 'x.json'}",
                timeout=120)
  assert r.returncode == 2 and "eval_output" in r.stderr and "does not exist" in r.stderr, \
      r.stderr[-1500:]
