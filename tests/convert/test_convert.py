"""The restricted .pt reader and the converter's errors."""

import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import yaml

from sh2_jax.convert import torch_pickle
from sh2_jax.convert.vortex import config_from_yaml, from_vortex

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
PT = os.path.join(FIX, "vortex_tiny", "state_dict.pt")
YML = os.path.join(FIX, "vortex_tiny", "config.yml")


def test_reader_memmaps_and_skips_blobs():
  sd = torch_pickle.load_state_dict(os.path.join(FIX, "vortex_tiny_parts", "state_dict.pt"))
  blobs = [k for k, v in sd.items() if isinstance(v, torch_pickle.BytesBlob)]
  assert len(blobs) == 6 and all(k.endswith("projections._extra_state") for k in blobs)
  emb = sd["embedding_layer.weight"]
  assert emb.shape == (512, 64) and emb.dtype == np.float32
  base = emb
  while base is not None and not isinstance(base, np.memmap):
    base = getattr(base, "base", None)
  assert isinstance(base, np.memmap), "tensors must stay memory-mapped"
  plain = torch_pickle.load_state_dict(PT)
  for k, v in plain.items():
    np.testing.assert_array_equal(v, sd[k])


def _rewrite_pickle(tmp_path, mutate):
  """Copy the fixture archive with data.pkl replaced by mutate(original dict pickle bytes)."""
  out = tmp_path / "x.pt"
  with zipfile.ZipFile(PT) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("data.pkl"):
        data = mutate(data)
      dst.writestr(info, data)
  return str(out)


def test_reader_refuses_code(tmp_path):
  evil = pickle.dumps({"x": os.system}, protocol=2)  # a global outside the allow-list
  path = _rewrite_pickle(tmp_path, lambda _: evil)
  with pytest.raises(torch_pickle.CheckpointError, match="refusing to load posix.system"):
    torch_pickle.load_state_dict(path)


def test_missing_and_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nor .*part0"):
    torch_pickle.load_state_dict(str(tmp_path / "none.pt"))
  (tmp_path / "junk.pt").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a torch.save zip archive"):
    torch_pickle.load_state_dict(str(tmp_path / "junk.pt"))
  src = os.path.join(FIX, "vortex_tiny_parts", "state_dict.pt.part1")
  shutil.copy(src, tmp_path / "gap.pt.part1")
  with pytest.raises(ValueError, match=r"not numbered 0..N-1: found \[1\]"):
    torch_pickle.load_state_dict(str(tmp_path / "gap.pt"))


def test_converter_lists_missing_unexpected_misshaped(tmp_path):
  sd = torch_pickle.load_state_dict(PT)
  cfg = yaml.safe_load(open(YML))
  cfg["inner_mlp_size"] = 96          # every mlp weight becomes mis-shaped
  cfg["attn_layer_idxs"] = [3]        # layer 7's attention keys become unexpected ...
  cfg["hcs_layer_idxs"] = [0, 4, 7]   # ... and its Hyena keys missing
  bad = tmp_path / "bad.yml"
  bad.write_text(yaml.safe_dump(cfg))
  with pytest.raises(ValueError) as e:
    from_vortex(PT, str(bad))
  msg = str(e.value)
  assert "missing (" in msg and "blocks.7.filter.h" in msg
  assert "unexpected (" in msg and "blocks.7.inner_mha_cls.Wqkv.weight" in msg
  assert "mis-shaped (" in msg and "blocks.0.mlp.l1.weight: (128, 64) (expected (96, 64))" in msg
  assert len(sd) == 86


@pytest.mark.parametrize("key,value,message", [
    ("interleave", False, "unsupported vortex config values {'interleave': False}"),
    ("hyena_flip_x1x2", True, "hyena_flip_x1x2"),
    ("hcl_filter_groups", 8, "hcl_filter_groups 8 is not supported"),
    ("num_attention_heads", 3, "num_heads 3 is not valid"),
])
def test_config_errors(key, value, message):
  cfg = yaml.safe_load(open(YML))
  cfg[key] = value
  with pytest.raises(ValueError, match=message):
    config_from_yaml(cfg)


def test_cli_writes_loadable_checkpoint(tmp_path):
  import subprocess
  import sys
  import jax.numpy as jnp
  from sh2_jax.checkpoint import load_model
  out = tmp_path / "ckpt"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, "-m", "sh2_jax.convert", "--checkpoint", PT,
                      "--config", YML, "--output", str(out)], capture_output=True, text=True,
                     cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  assert "372,016 parameters" in r.stdout
  tokens = jnp.asarray(np.load(os.path.join(FIX, "vortex_tiny", "inputs.npz"))["tokens"])
  ref = np.load(os.path.join(FIX, "vortex_tiny", "logits.npz"))["logits"]
  out_logits = np.asarray(load_model(str(out))(tokens))
  assert np.linalg.norm(out_logits - ref) / np.linalg.norm(ref) <= 1e-5
  r2 = subprocess.run([sys.executable, "-m", "sh2_jax.convert", "--checkpoint", PT + "x",
                       "--config", YML, "--output", str(tmp_path / "other")],
                      capture_output=True, text=True, cwd=root)
  assert r2.returncode != 0 and "not found" in r2.stderr and "Traceback" not in r2.stderr
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda text: "\n".join(ln for ln in text.splitlines() if "hidden_size" not in ln),
     "the vortex config has no 'hidden_size' key"),
    (lambda text: text.replace("num_layers: 8", "num_layers: abc"),
     "{'num_layers': 'abc'} must be numbers"),
    (lambda text: "a: [1, 2\nb: :\n", "is not valid YAML"),
])
def test_bad_yaml_is_one_error(tmp_path, edit, message):
  from sh2_jax.convert.vortex import read_yaml
  path = tmp_path / "c.yml"
  path.write_text(edit(open(YML).read()))
  with pytest.raises(ValueError, match=message):
    config_from_yaml(read_yaml(str(path)))


def test_a_model_too_large_for_the_machine_is_refused_before_reading(tmp_path):
  """A width of 1M: the abstract parameters (128 TiB) are weighed against the device's memory
  before the checkpoint is opened."""
  path = tmp_path / "huge.yml"
  text = open(YML).read()
  for key in ("hidden_size", "num_filters", "hcl_filter_groups"):
    text = "\n".join(f"{key}: 1048576" if ln.startswith(f"{key}:") else ln
                     for ln in text.splitlines())
  path.write_text(text)
  with pytest.raises(ValueError, match=r"^the model's parameters need 128\.0 TiB on one device, "
                                       r"more than .*; convert on a machine with more memory"):
    from_vortex(str(tmp_path / "never_read.pt"), str(path))


def _fake_state_dict(preset: str) -> dict:
  """Every tensor of ``preset``'s reference checkpoint as a zero-stride view: the names and
  shapes of a 7B checkpoint without its 26 GB."""
  from sh2_jax.convert.vortex import _expected_keys
  from sh2_jax.presets import get_preset
  zero = np.zeros((), np.float32)
  return {k: np.broadcast_to(zero, s) for k, s in _expected_keys(get_preset(preset)).items()}


def test_checkpoint_with_the_wrong_config_names_the_matching_one():
  """A 7B checkpoint converted with the 1B config (or any other mismatch with a known model):
  one line naming the presets and reference configs its shapes match."""
  from sh2_jax.convert.vortex import check_state_dict, matching_presets_for
  from sh2_jax.presets import get_preset
  sd = _fake_state_dict("evo2_7b")
  assert matching_presets_for(sd) == ["evo2_7b"]
  with pytest.raises(ValueError) as e:
    check_state_dict(sd, get_preset("evo2_1b_base"))
  msg = str(e.value)
  assert "\n" not in msg and "mis-shaped (" in msg and "more)" in msg
  assert msg.endswith("its shapes match preset evo2_7b (reference config evo2-7b-1m.yml): "
                      "pass --config evo2_7b (or that YAML)")
  with pytest.raises(ValueError, match=r"match preset evo2_7b_base \(reference config "
                     r"evo2-7b-8k.yml\) and evo2_7b_262k .* and evo2_7b_microviridae"):
    check_state_dict(_fake_state_dict("evo2_7b_base"), get_preset("evo2_7b"))


def test_convert_by_model_name(monkeypatch):
  """``--config NAME``: the preset's shapes, mr_decay 'none' (the decay is in the weights)."""
  from sh2_jax import presets
  cfg = config_from_yaml(yaml.safe_load(open(YML))).to_dict()
  monkeypatch.setitem(presets.PRESETS, "fixture", {**cfg, "mr_decay": "weak"})
  model = from_vortex(PT, "fixture")
  assert model.cfg.mr_decay == "none"
  tokens = np.load(os.path.join(FIX, "vortex_tiny", "inputs.npz"))["tokens"]
  ref = np.load(os.path.join(FIX, "vortex_tiny", "logits.npz"))["logits"]
  out = np.asarray(model(tokens))
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-5
  with pytest.raises(ValueError, match="neither a YAML file nor a model name"):
    from_vortex(PT, "evo9_nope")


def test_cli_wrong_model_name_is_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, "-m", "sh2_jax.convert", "--checkpoint", PT, "--config",
                      "evo2_1b_base", "--output", str(tmp_path / "out")], capture_output=True,
                     text=True, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2
  lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "RuntimeWarning" not in ln
           and "runpy" not in ln]
  assert len(lines) == 1 and lines[0].startswith("error: checkpoint does not match the config: ")
  assert not (tmp_path / "out").exists()


def test_cli_output_under_a_file_is_one_line_before_converting(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  r = subprocess.run([sys.executable, "-m", "sh2_jax.cli.convert", "--checkpoint", PT,
                      "--config", YML, "--output", str(blocker / "out")], capture_output=True,
                     text=True, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert lines == [f"error: --output '{blocker / 'out'}': '{blocker}' is a file, not a "
                   "directory"], lines
