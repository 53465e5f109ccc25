"""Weights by name: a local Hugging Face hub cache in the reference layout, built from the golden
``vortex_tiny`` fixture (one ``.pt``, or ``.pt.partN`` shards), converted once into the sh2_jax
cache; no network (``local_files_only``)."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import sh2_jax
from sh2_jax import hub, presets
from sh2_jax.convert.vortex import config_from_yaml, read_yaml

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAME, REPO = "vortex_tiny", "fixture-org/vortex_tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def released(tmp_path, monkeypatch):
  """The fixture registered as a released model, an empty sh2_jax cache and a hub cache root."""
  cfg = config_from_yaml(read_yaml(os.path.join(FIX, "vortex_tiny", "config.yml"))).to_dict()
  monkeypatch.setitem(presets.PRESETS, NAME, cfg)
  monkeypatch.setitem(presets.RELEASES, NAME, presets.Release(REPO, "config.yml", 1024))
  monkeypatch.setenv("SH2_JAX_CACHE", str(tmp_path / "sh2_cache"))
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  return tmp_path


def hub_snapshot(root, files: dict[str, str]) -> str:
  """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
  repo_dir = root / "hub" / ("models--" + REPO.replace("/", "--"))
  snap = repo_dir / "snapshots" / COMMIT
  snap.mkdir(parents=True)
  (repo_dir / "refs").mkdir()
  (repo_dir / "refs" / "main").write_text(COMMIT)
  for dst, src in files.items():
    shutil.copy(src, snap / dst)
  return str(snap)


def fixture_logits(model):
  tokens = jnp.asarray(np.load(os.path.join(FIX, "vortex_tiny", "inputs.npz"))["tokens"])
  ref = np.load(os.path.join(FIX, "vortex_tiny", "logits.npz"))["logits"]
  out = np.asarray(model(tokens))
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("layout", ["single", "shards"])
def test_load_by_name_converts_once_from_the_hub(released, layout):
  if layout == "single":
    hub_snapshot(released, {f"{NAME}.pt": os.path.join(FIX, "vortex_tiny", "state_dict.pt")})
  else:
    parts = os.path.join(FIX, "vortex_tiny_parts", "state_dict.pt.part")
    hub_snapshot(released, {f"{NAME}.pt.part{i}": f"{parts}{i}" for i in (0, 1)})
  model = sh2_jax.load(NAME, local_files_only=True)
  assert fixture_logits(model) <= 1e-5
  converted = released / "sh2_cache" / NAME
  assert (converted / "params").is_dir()
  shutil.rmtree(released / "hub")  # from now on the converted cache alone serves the name
  again = sh2_jax.load(NAME, dtype="bfloat16", local_files_only=True)
  assert again.cfg.dtype == "bfloat16" and again.cfg.mr_decay == "none"
  assert fixture_logits(sh2_jax.load(NAME)) <= 1e-5


def test_missing_weights_say_what_to_download(released):
  with pytest.raises(hub.WeightsNotFound) as e:
    sh2_jax.load(NAME, local_files_only=True)
  msg = str(e.value)
  assert "\n" not in msg
  for part in (REPO, f"{NAME}.pt", f"{NAME}.pt.part0", str(released / "sh2_cache" / NAME)):
    assert part in msg
  hub_snapshot(released, {"other.bin": os.path.join(FIX, "vortex_tiny", "config.yml")})
  with pytest.raises(hub.WeightsNotFound, match=f"holds neither {NAME}.pt nor"):
    sh2_jax.load(NAME, local_files_only=True)
  assert not (released / "sh2_cache").exists()
  # random weights stay available explicitly
  assert sh2_jax.load(f"random:{NAME}").cfg.d_model == 64


def test_wrong_weights_in_the_cache_name_their_preset(released):
  from sh2_jax.checkpoint import save_model
  save_model(str(released / "sh2_cache" / NAME), sh2_jax.load("tiny"))
  with pytest.raises(ValueError, match=rf"is not '{NAME}': d_model: checkpoint 128, config 64.*"
                     r"its shapes match preset tiny"):
    sh2_jax.load(NAME, local_files_only=True)
