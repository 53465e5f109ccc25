"""The training-step benchmark's plumbing on CPU (``--smoke``): both models run, the table and
JSON rows come out, and the held-out loss (the benchmark's leak check) is reported."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_smoke(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"),
                         "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "train_step.jsonl")]
  steps = [r for r in rows if r.get("kind") == "step"]
  assert {r["model"] for r in steps} == {"SH2 (Evo 2 7B layout)", "Transformer (all MHA)"}
  for r in steps:
    assert r["step_s"] > 0, r
    # random bytes: a fresh batch's loss stays near ln 256 = 5.55 after a few steps
    assert 4.5 < r["heldout_loss"] < 8.0, r
  assert "| L | SH2 ms/step" in proc.stdout


def test_train_step_takes_the_fastest_remat_that_fits(monkeypatch):
  """``--remat auto``: XLA's memory analysis of each compiled setting, fastest first, against
  the device's limit (patched here: CPU reports none)."""
  import pytest
  sys.path.insert(0, ROOT)
  from benchmarks import train_step as ts
  from benchmarks.transformer import evo2_7b_layout
  cfg = evo2_7b_layout(128, 4, dtype="float32", conv_impl="xla", attention_impl="xla",
                       li_impl="fft")
  free = ts.Point(cfg, 512, "auto", None)
  assert free.remat == "none" and list(free.memory) == ["none"]
  # a limit just under what "none" needs: the next setting that fits is taken
  limit = int(free.memory["none"] / ts.FIT_SHARE) - 1
  monkeypatch.setattr(ts, "device_memory_limit", lambda: limit)
  tight = ts.Point(cfg, 512, "auto", None)
  assert tight.remat in ("dots", "blocks") and list(tight.memory)[0] == "none"
  assert tight.memory[tight.remat] <= ts.FIT_SHARE * limit < tight.memory["none"]
  assert tight.run(1) > 0
  monkeypatch.setattr(ts, "device_memory_limit", lambda: 1)
  with pytest.raises(MemoryError, match="no remat setting fits"):
    ts.Point(cfg, 512, "auto", None)
