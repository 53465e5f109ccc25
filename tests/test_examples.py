"""The worked examples run end to end (tiny random model)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variant_effect_example(tmp_path):
  script = os.path.join(ROOT, "examples", "variant_effect.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, script, "--window=64"], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "RANDOM WEIGHTS" in r.stdout
  rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("synthetic")]
  assert [row[:3] for row in rows[:2]] == [["synthetic_gene:201", "A>C", "1"],
                                          ["synthetic_gene:202", "T>G", "1"]]
  assert len(rows) == 10 and "AUROC of -delta for label 1" in r.stdout
  bad = tmp_path / "bad.tsv"
  bad.write_text("chrom\tpos\tref\talt\nsynthetic_gene\t201\tG\tC\n")
  r = subprocess.run([sys.executable, script, f"--variants={bad}"], capture_output=True,
                     text=True, cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 2 and "the reference has 'A' at synthetic_gene:201" in r.stderr
