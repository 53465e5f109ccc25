"""Two JAX processes on localhost (CPU, one device each, gloo collectives) train with the same
global batch as one process with two devices, and log the same losses."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config=configs/tiny.py", "--config.model.d_model=32", "--config.model.mlp_hidden=64",
        "--config.model.se_groups=4", "--config.model.mr_groups=4", "--config.model.mr_len=16",
        "--config.seq_len=32", "--config.batch_size=4", "--config.num_steps=4",
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_every=4",
        "--config.eval_batches=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, f)]


def test_two_processes_match_one(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "train.py", *ARGS, f"--workdir={tmp_path / 'multi'}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  single = subprocess.Popen(
      [sys.executable, "train.py", *ARGS, f"--workdir={tmp_path / 'single'}"], cwd=ROOT,
      env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for p in [*procs, single]:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  assert [s for s, _, _ in multi] == [1, 2, 3, 4]
  assert multi == one  # same global batch, same mesh shape: identical numbers
  data_state = sorted(os.listdir(tmp_path / "multi" / "checkpoints" / "4" / "data"))
  assert "process_0-of-2.json" in data_state and "process_1-of-2.json" in data_state
