"""The worked examples run end to end (tiny random model)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variant_effect_example():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "variant_effect.py"),
                      "--window=64", "--variants=215:A,700:G"], capture_output=True, text=True,
                     cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "RANDOM WEIGHTS" in r.stdout
  rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith(("215", "700"))]
  assert [row[:3] for row in rows] == [["215", "G", "A"], ["700", "A", "G"]]
  r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "variant_effect.py"),
                      "--variants=215:G"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert r.returncode != 0 and "already the reference base" in r.stderr
