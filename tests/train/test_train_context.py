"""train.py on a context-parallel mesh (8 host CPU devices) logs the losses of context 1."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _losses(workdir, context):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.mesh.context={context}", "--config.num_steps=4",
       "--config.log_every=1", "--config.checkpoint_every=0", "--config.eval_every=0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_context4_matches_context1(tmp_path):
  base = _losses(str(tmp_path / "c1"), 1)
  cp = _losses(str(tmp_path / "c4"), 4)
  assert len(base) == len(cp) == 4
  np.testing.assert_allclose(cp, base, rtol=1e-5)
