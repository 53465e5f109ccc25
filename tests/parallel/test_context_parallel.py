"""Context parallelism (sh2_jax/parallel) equals the unsharded computation.

The checks need 8 devices; a forced host device count must be set before JAX starts, and pytest
runs every test file in one process, so they run once in a subprocess
(``context_parallel_checks.py``) and each result becomes one test here. Context sizes 2, 4, 8;
chunks of 40 tokens (shorter than MR's 127-token halo); float32; relative error <= 1e-5 for
forward and gradients of every operator and of the whole model, and the trainer's
``train_step`` on a context-4 mesh (8 devices) logging the same losses as unsharded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sh2_jax.parallel.zigzag import zigzag_chunk_order, zigzag_permutation

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5
SIZES = (2, 4, 8)
OPS = ("featurizer", "SE-p2p", "MR-p2p", "MR-a2a", "LI-a2a", "LI-p2p_fft", "LI-state",
       "MHA-allgather", "MHA-ring")
EXPECTED = ([f"{op}/n{n}/{part}" for n in SIZES for op in OPS for part in ("fwd", "grad")]
            + [f"model-default/n{n}/{part}" for n in SIZES for part in ("logits", "grad")]
            + ["model-a2a-p2pfft-ring-remat/n4/logits", "model-a2a-p2pfft-ring-remat/n4/grad",
               "model-state/n8/logits", "model-state/n8/grad"]
            + [f"train/context{c}-vs-1/step{i}" for c in ("4", "4-modes", "4-fsdp")
               for i in range(3)]
            + [f"segmented/{m}/{part}" for m in ("context2", "context8", "data2xcontext4")
               for part in ("logits", "score", "kv-sharded")]
            + ["generate/context4/tokens", "generate/context4/logits"]
            + ["embed/context4/mesh", "embed/context4/segmented-mesh"]
            + ["error/a2a-groups-split", "error/length-not-divisible",
               "error/p2p-fft-power-of-two", "error/bad-mode", "error/segmented-mesh-axis",
               "error/generate-mesh-unequal"])


def _run_checks():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(HERE, "context_parallel_checks.py")],
                        capture_output=True, text=True, env=env,
                        timeout=2400)  # a hang guard: the checks take ~10 min on 2 loaded cores
  if proc.returncode:
    pytest.fail(f"context_parallel_checks.py failed:\n{proc.stderr[-4000:]}")
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  return {row["name"]: row for row in rows}


# Under ``pytest -n N`` (``--dist loadgroup``, pyproject.toml) every test of this module goes to
# one worker, which runs the subprocess once; the other workers run the rest of the suite
# meanwhile instead of waiting for its rows.
pytestmark = pytest.mark.xdist_group("context_parallel_checks")


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
  """The checks' rows, run once per test run: if more than one worker gets tests of this module
  (a run without ``--dist loadgroup``) each would run the subprocess (~6 CPU-minutes) itself, so
  the first one runs it under a lock in the run's shared base directory and the others read its
  rows."""
  if not hasattr(request.config, "workerinput"):  # not an xdist worker: one process
    return _run_checks()
  import fcntl
  shared = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
  out = shared / "context_parallel_checks.json"
  with open(shared / "context_parallel_checks.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if out.is_file():
      return json.loads(out.read_text())
    rows = _run_checks()
    out.write_text(json.dumps(rows))
    return rows


@pytest.mark.parametrize("name", EXPECTED)
def test_context_parallel_matches_unsharded(results, name):
  assert name in results, f"check {name} did not run; ran: {sorted(results)}"
  row = results[name]
  assert np.isfinite(row["rel_err"]) and row["rel_err"] <= TOL, row


@pytest.mark.parametrize("length,n", [(8, 1), (16, 2), (48, 4), (640, 8)])
def test_zigzag_permutation(length, n):
  perm = zigzag_permutation(length, n)
  assert sorted(perm.tolist()) == list(range(length))  # a permutation
  c = length // (2 * n)
  for r in range(n):  # rank r's rows are chunks r and 2N-1-r
    rows = perm[2 * c * r:2 * c * (r + 1)]
    assert rows[:c].tolist() == list(range(r * c, (r + 1) * c))
    assert rows[c:].tolist() == list(range((2 * n - 1 - r) * c, (2 * n - r) * c))
  assert zigzag_chunk_order(n).tolist()[:2] == [0, 2 * n - 1]


def test_zigzag_roundtrip():
  import jax.numpy as jnp
  from sh2_jax.parallel.zigzag import zigzag_shard, zigzag_unshard
  x = jnp.arange(2 * 48 * 3).reshape(2, 48, 3)
  z = zigzag_shard(x, 4)
  assert not np.array_equal(np.asarray(z), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(zigzag_unshard(z, 4)), np.asarray(x))
