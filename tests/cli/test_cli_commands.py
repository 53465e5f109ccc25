"""The commands' shared start (``sh2_jax/cli/launch.py``) and ``--config`` by preset name, run
as a user runs them: through the checkout's ``train.py`` shim in a subprocess."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=240, env={**env, "JAX_PLATFORMS": "cpu"})


def test_config_takes_a_preset_name_or_a_file():
  cases = [("--config=tiny", "--dry_run"), ("--config", "tiny", "--dry_run"),
           ("--config=configs/tiny.py", "--dry_run"),
           ("--config=tiny", "--config.model.d_model=64", "--dry_run"),
           ("--config=tinyy", "--dry_run"), ("--config=nowhere/tiny.py", "--dry_run"),
           ("--config=tiny", "--config.nope=1", "--dry_run")]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    by_name, spaced, by_file, narrow, typo, missing, bad_key = pool.map(
        lambda a: _train(*a), cases)
  for r in (by_name, spaced, by_file, narrow):
    assert r.returncode == 0, r.stderr[-2000:]
  assert by_name.stdout == spaced.stdout == by_file.stdout and "731,448" in by_name.stdout
  assert narrow.stdout != by_name.stdout  # the override reached the preset's config
  for r, message in [(typo, "--config 'tinyy' is neither a config file nor a shipped config; "
                            "shipped: "),
                     (missing, "cannot load the --config file"),
                     (bad_key, "unknown config key 'nope'")]:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines
  assert "tiny" in typo.stderr and "evo2_7b" in typo.stderr


def test_help_describes_the_command_not_the_shim():
  r = _train("--help")
  assert "sh2-train --config=tiny --workdir=runs/tiny" in r.stdout  # the command's docstring
  assert "--workdir" in r.stdout and "--dry_run" in r.stdout  # and its flags
  assert "Checkout shim" not in r.stdout


def test_missing_flags_are_one_error_line():
  """absl reports each missing required flag on its own line; the commands print one."""
  r = subprocess.run([sys.executable, "-m", "sh2_jax.convert", "--output=x"], cwd=ROOT,
                     capture_output=True, text=True, timeout=240)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
  assert "--checkpoint" in lines[0] and "--config" in lines[0] and "--output=x" not in lines[0]
