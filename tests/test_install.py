"""``pip install .`` into a fresh virtual environment, then the installed commands run from
another directory: what a user gets from the package, not from the checkout.

The environment is made with ``--system-site-packages`` plus a ``.pth`` line naming this
interpreter's site-packages (a venv made from a venv sees the base interpreter's packages, not
the parent venv's), so the pinned requirements are there and nothing is downloaded: the
install is ``pip install --no-index --no-deps --no-build-isolation`` of a copy of the checkout.
All five commands are installed and run (``sh2-score`` and ``sh2-embed`` on the converted fixture).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import site
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "vortex_tiny")
COMMANDS = ("sh2-train", "sh2-generate", "sh2-convert", "sh2-score", "sh2-embed")


def tensorboard_tags(logdir: str) -> dict[str, str]:
  """Tag -> plugin name of every summary value in the event files under ``logdir`` (the
  TFRecord framing read by hand: length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2
  tags = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    data, i = open(path, "rb").read(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        tags[value.tag] = value.metadata.plugin_data.plugin_name
  return tags


def _make_venv(tmp_path) -> str:
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(venv)], check=True, timeout=120)
  purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(purelib, "_test_interpreter_packages.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  return str(venv)


def _copy_checkout(dest) -> str:
  """What ``pip install .`` reads (the build then writes into the copy, not the checkout)."""
  os.makedirs(dest)
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(ROOT, name), dest)
  shutil.copytree(os.path.join(ROOT, "sh2_jax"), os.path.join(dest, "sh2_jax"),
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return str(dest)


def _noise(stderr: str) -> list[str]:
  """Log lines a user command should not print: absl/Python INFO records, JAX's TPU probe."""
  lines = stderr.replace("\r", "\n").splitlines()
  return [ln for ln in lines if "INFO" in ln or "tpu" in ln.lower()
          or (len(ln) > 5 and ln[0] == "I" and ln[1:5].isdigit())]


def test_pip_install_then_the_commands_from_another_directory(tmp_path):
  venv = _make_venv(tmp_path)
  python, bin_dir = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin")
  src = _copy_checkout(tmp_path / "src")
  r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                      "--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check",
                      src],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  for command in COMMANDS:
    assert os.access(os.path.join(bin_dir, command), os.X_OK), command

  work = tmp_path / "elsewhere"
  work.mkdir()
  # As a user runs them: no PYTHONPATH, JAX_PLATFORMS unset (JAX probes its backends, which
  # used to log "Unable to initialize backend 'tpu'"; the pinned jaxlib has only the CPU one).
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
  env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")

  def run(*args):
    return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)

  # The installed distribution: one top-level package with its data, the version of the source.
  r = run(python, "-c", "import importlib.metadata as m, importlib.util as u, json; "
          "d = m.distribution('sh2-jax'); print(json.dumps({'version': d.version, "
          "'top': d.read_text('top_level.txt').split(), 'files': [str(f) for f in d.files], "
          "'origin': u.find_spec('sh2_jax').origin, 'requires': d.requires, "
          "'extras': d.metadata.get_all('Provides-Extra')}))")
  assert r.returncode == 0, r.stderr
  dist = json.loads(r.stdout)
  import sh2_jax
  assert dist["version"] == sh2_jax.__version__
  assert dist["top"] == ["sh2_jax"] and dist["origin"].startswith(venv)
  assert "sh2_jax/data/corpus/synthetic_genome.fa" in dist["files"]
  assert any(f.endswith("licenses/LICENSE") for f in dist["files"])
  assert set(dist["extras"]) >= {"cuda12", "cuda13", "test", "bench"}
  runtime = [r for r in dist["requires"] if "extra ==" not in r]
  assert any(r.startswith("jax") for r in runtime) and not any("pytest" in r for r in runtime)
  assert 'jax[cuda12]==0.11.2; extra == "cuda12"' in dist["requires"]

  # sh2-train: a preset name, the shipped corpus (package data), quiet logs.
  r = run("sh2-train", "--config=tiny", f"--workdir={work / 'W'}", "--config.num_steps=3",
          "--config.eval_batches=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 3 | loss" in r.stdout and "eval_loss" in r.stdout
  assert not _noise(r.stderr), _noise(r.stderr)
  assert os.path.isdir(work / "W" / "checkpoints" / "3")
  tags = tensorboard_tags(str(work / "W" / "tensorboard"))
  assert {"train/loss", "train/lr", "eval/loss", "eval/bits_per_byte"} <= set(tags), tags
  assert tags["config/text_summary"] == "text" and tags["_hparams_/experiment"] == "hparams"
  assert not {"loss", "eval_loss"} & set(tags)

  # sh2-convert: the reference code's fixture checkpoint.
  r = run("sh2-convert", "--checkpoint", os.path.join(FIXTURE, "state_dict.pt"), "--config",
          os.path.join(FIXTURE, "config.yml"), "--output", str(work / "converted"))
  assert r.returncode == 0 and "372,016 parameters" in r.stdout, r.stderr[-3000:]

  # sh2-generate: FASTA prompts through the converted model, clean FASTA out.
  (work / "prompts.fa").write_text(">a\nACGTACGT\n>b\nTTGA\n")
  r = run("sh2-generate", "--model", str(work / "converted"), "--fasta", "prompts.fa",
          "--max_new_tokens", "6", "--logprobs", "lp.tsv")
  assert r.returncode == 0, r.stderr[-3000:]
  assert not _noise(r.stderr), _noise(r.stderr)
  lines = r.stdout.splitlines()
  assert [ln.split()[0] for ln in lines[::2]] == [">a", ">b"] and len(lines) == 4
  assert lines[0].startswith(">a prompt_len=8 new_tokens=6 ")
  assert lines[1].startswith("ACGTACGT") and len(lines[1]) == 14 and "|" not in r.stdout
  assert len((work / "lp.tsv").read_text().splitlines()) == 1 + 2 * 6

  # sh2-score and sh2-embed: the same FASTA through the converted model.
  r = run("sh2-score", "--model", str(work / "converted"), "--fasta", "prompts.fa",
          "--out", "scores.tsv")
  assert r.returncode == 0, r.stderr[-3000:]
  assert not _noise(r.stderr), _noise(r.stderr)
  rows = (work / "scores.tsv").read_text().splitlines()
  assert len(rows) == 3 and rows[1].split("\t")[:2] == ["a", "8"], rows
  r = run("sh2-embed", "--model", str(work / "converted"), "--fasta", "prompts.fa",
          "--layers", "blocks.0", "--out", "emb.npz")
  assert r.returncode == 0, r.stderr[-3000:]
  assert not _noise(r.stderr), _noise(r.stderr)
  import numpy as np
  with np.load(work / "emb.npz") as z:
    assert list(z["names"]) == ["a", "b"] and z["blocks.0"].shape[0] == 2, dict(z)
