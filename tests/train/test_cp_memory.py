"""Train-step memory on a context mesh (issue 18): XLA's memory analysis of the compiled step.

On the GPU the context-parallel step needed 6.0 GiB more per added layer at the 7B width and
128K (0.7 GiB once XLA GPU's latency-hiding scheduler is off there, ``step.compiler_options``);
XLA CPU has no such scheduler, so here the bound guards the JAX side of the same contract: the
block remat inside ``shard_map`` and the per-block parameter gather keep what each added layer
costs a device to about 1/N of the single-device figure plus one block's gathered parameters.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sh2_jax.train.step import LATENCY_HIDING, compiler_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.transformer import evo2_7b_layout  # noqa: E402

WIDTH, LENGTH, CONTEXT = 128, 2048, 4


def _block_param_bytes(layers: int) -> int:
  """The largest block's parameters, float32 (what one block's gather materialises)."""
  from sh2_jax.model import StripedHyena
  cfg = evo2_7b_layout(WIDTH, layers, dtype="bfloat16", max_seqlen=8192)
  model = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
  return max(sum(4 * math.prod(x.shape) for x in jax.tree.leaves(nnx.state(b, nnx.Param)))
             for b in model.blocks)


def test_context_mesh_memory_per_layer(tmp_path):
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "cp_memory.py"), "--platform", "cpu",
       "--width", str(WIDTH), "--length", str(LENGTH), "--layers", "4,7",
       "--meshes", f"1x1x1,1x1x{CONTEXT}", "--out", str(tmp_path), "--timeout_s", "1200"],
      cwd=ROOT, capture_output=True, text=True, timeout=1500)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "cp_memory.jsonl")]
  assert all(x["kind"] == "memory" for x in rows), rows
  temp = {(x["devices"], x["layers"]): x["temporaries"] for x in rows}
  single = (temp[1, 7] - temp[1, 4]) / 3   # per added layer (SE, MR, LI), one device
  cp = (temp[CONTEXT, 7] - temp[CONTEXT, 4]) / 3
  # the single-device step keeps each block's input: B * L * D bf16 at the least
  assert single >= LENGTH * WIDTH * 2, single
  bound = single / CONTEXT + 2 * _block_param_bytes(7)  # a block's gathered params + gradient
  assert cp <= bound, (f"context {CONTEXT}: {cp / 2**20:.2f} MiB per added layer, bound "
                       f"{bound / 2**20:.2f} MiB (single device {single / 2**20:.2f} MiB)")


def test_latency_hiding_off_on_a_context_mesh():
  mesh1 = jax.make_mesh((1, 1, 1), ("data", "fsdp", "context"))
  off = {"xla_gpu_enable_latency_hiding_scheduler": False}
  assert compiler_options(None) == {} and compiler_options(mesh1) == {}
  assert compiler_options(mesh1, "off") == off

  class FakeMesh:  # a context axis of 4 without 4 devices
    shape = {"data": 1, "fsdp": 1, "context": 4}
  assert compiler_options(FakeMesh()) == off
  assert compiler_options(FakeMesh(), "on") == {}
  assert LATENCY_HIDING == ("auto", "on", "off")
  with pytest.raises(ValueError, match="latency_hiding 'fast'"):
    compiler_options(mesh1, "fast")


def test_latency_hiding_is_validated():
  from sh2_jax.configs.base import make_config
  from sh2_jax.train import check
  c = make_config("tiny")
  check.validate(c)
  c.latency_hiding = "sometimes"
  with pytest.raises(ValueError, match="latency_hiding 'sometimes' is not valid"):
    check.validate(c)
  np.testing.assert_equal(LATENCY_HIDING[0], make_config("tiny").latency_hiding)
