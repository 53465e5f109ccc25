"""The reference model names, deprecated aliases, the zoo table and ``load`` by name."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax import presets, zoo
from sh2_jax.inference.cache import cache_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_names_mean_what_they_mean_in_evo2():
  p = presets.get_preset
  # evo2_7b is the 1M-context 7B (evo2-7b-1m.yml), evo2_7b_base the 8K one (evo2-7b-8k.yml).
  assert (p("evo2_7b").mlp_hidden, p("evo2_7b").rope_scale, p("evo2_7b").max_seqlen) == (
      11264, 128.0, 1 << 20)
  assert (p("evo2_7b_base").mlp_hidden, p("evo2_7b_base").rope_scale) == (11008, 1.0)
  assert (p("evo2_7b_262k").rope_scale, p("evo2_7b_262k").max_seqlen) == (32.0, 262144)
  assert p("evo2_40b").mlp_hidden == 22528 and p("evo2_40b_base").mlp_hidden == 21888
  assert p("evo2_1b_base").d_model == 1920
  assert p("evo2_7b_microviridae") == p("evo2_7b_base")
  assert [i for i, t in enumerate(p("evo2_7b").layer_types) if t == "MHA"] == [3, 10, 17, 24, 31]
  rel = presets.RELEASES
  assert rel["evo2_7b"].repo == "arcinstitute/evo2_7b"
  assert rel["evo2_7b"].reference_config == "evo2-7b-1m.yml"
  assert rel["evo2_7b_base"].reference_config == "evo2-7b-8k.yml"
  assert rel["evo2_7b_microviridae"].repo == "evo-design/evo-2-7b-8k-microviridae"
  assert rel["evo2_40b_base"].filename("evo2_40b_base") == "evo2_40b_base.pt"
  assert {n: r.context for n, r in rel.items()} == {
      "evo2_1b_base": 8192, "evo2_7b_base": 8192, "evo2_7b_262k": 262144, "evo2_7b": 1 << 20,
      "evo2_7b_microviridae": 8192, "evo2_20b": 1 << 20, "evo2_40b_base": 8192,
      "evo2_40b": 1 << 20}
  assert set(rel) <= set(presets.PRESETS)
  assert presets.matching_presets(p("evo2_7b_262k")) == [
      "evo2_7b_base", "evo2_7b_262k", "evo2_7b_microviridae"]


@pytest.mark.parametrize("old,new", sorted(presets.DEPRECATED.items()))
def test_deprecated_names_warn_once_and_map(old, new, monkeypatch):
  monkeypatch.setattr(presets, "_warned", set())
  with pytest.warns(FutureWarning, match=f"{old!r} is deprecated; use {new!r}"):
    assert presets.get_preset(old) == presets.get_preset(new)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    presets.get_preset(old)  # once per process
  from sh2_jax.configs.base import make_config
  assert make_config(old).preset == new


def test_zoo_list_shows_context_and_weights(capsys):
  assert zoo.main(["list", "tiny", "evo2_7b", "evo2_7b_base", "evo2_40b_base"]) == 0
  lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[2:]}
  assert lines["evo2_7b"][1] == "1M" and lines["evo2_7b"][-1] == "arcinstitute/evo2_7b"
  assert "6.582B" in lines["evo2_7b"]
  assert lines["evo2_7b_base"][1] == "8K" and "6.481B" in lines["evo2_7b_base"]
  assert lines["evo2_40b_base"][1] == "8K"
  assert zoo.main(["list", "nope"]) == 2
  assert "error: unknown preset(s) ['nope']" in capsys.readouterr().err
  # evo2_7b's decode cache at 8K: only the 5 MHA layers grow with the context.
  cfg7 = presets.get_preset("evo2_7b", dtype="bfloat16")
  kv_per_layer = 2 * 8192 * 4096 * 2
  assert 5 * kv_per_layer < cache_bytes(cfg7, 1, 8192) < 5 * kv_per_layer + 2**25


def test_load_random_and_checkpoint(tmp_path):
  from sh2_jax.checkpoint import save_model
  model = sh2_jax.load("tiny")  # no weights were ever released for tiny: random, warned
  same = sh2_jax.load("random:tiny")
  t = jnp.arange(20, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(np.asarray(model(t)), np.asarray(same(t)))
  save_model(str(tmp_path / "ckpt"), model)
  again = sh2_jax.load(str(tmp_path / "ckpt"))
  np.testing.assert_array_equal(np.asarray(again(t)), np.asarray(model(t)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 731448
  with pytest.raises(ValueError, match="neither a checkpoint directory nor a model name"):
    sh2_jax.load("evo3_999b")
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    sh2_jax.load("random:nope")


def test_released_name_without_weights_is_one_error(tmp_path):
  """A released name never falls back to random weights: offline and uncached, one message
  says what to download and where to put it (also from generate.py, exit 2)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
         "HF_HUB_CACHE": str(tmp_path / "hub"), "SH2_JAX_CACHE": str(tmp_path / "cache")}
  r = subprocess.run([sys.executable, "generate.py", "--model", "evo2_7b_base", "--prompt",
                      "ACGT"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  err = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(err) == 1 and err[0].startswith("error: no weights for 'evo2_7b_base'"), r.stderr
  for part in ("arcinstitute/evo2_7b_base", "evo2_7b_base.pt", ".part0",
               str(tmp_path / "cache" / "evo2_7b_base"), "hf download", "--config evo2_7b_base"):
    assert part in err[0], part
  assert not (tmp_path / "cache").exists()  # nothing written


def test_every_config_file_builds_a_preset():
  """configs/<name>.py (the checkout shims) and sh2_jax/configs/<name>.py for every preset."""
  import runpy
  names = set()
  for folder in ("configs", os.path.join("sh2_jax", "configs")):
    for f in sorted(os.listdir(os.path.join(ROOT, folder))):
      if f.endswith(".py") and f not in ("__init__.py", "base.py"):
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", FutureWarning)  # the deprecated names' shims
          c = runpy.run_path(os.path.join(ROOT, folder, f))["get_config"]()
        assert c.preset in presets.PRESETS, f
        names.add(f[:-3])
  assert set(presets.PRESETS) <= names
  assert set(presets.DEPRECATED) <= names
