"""The model against the reference fixture, plus layout/config validation and mixed precision."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sh2_jax import ModelConfig, StripedHyena, resolve_layout
from sh2_jax.convert import from_vortex
from sh2_jax.presets import PRESETS, get_preset
from sh2_jax.summary import summary

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "vortex_tiny")


@pytest.fixture(scope="module")
def fixture_model():
  return from_vortex(os.path.join(FIX, "state_dict.pt"), os.path.join(FIX, "config.yml"))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.load(os.path.join(FIX, "inputs.npz"))["tokens"])


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_fixture_logits(fixture_model, tokens):
  ref = np.load(os.path.join(FIX, "logits.npz"))["logits"]
  out = np.asarray(fixture_model(tokens))
  assert out.shape == ref.shape == (2, 300, 512)
  assert rel(out, ref) <= 1e-5
  assert np.max(np.abs(out - ref)) < 1e-4  # logit scale: std 4, max 22


def test_fixture_activations(fixture_model, tokens):
  ref = np.load(os.path.join(FIX, "activations.npz"))
  hs = fixture_model.hidden_states(tokens)
  assert sorted(ref.keys()) == sorted(hs.keys())
  for name in ref:
    assert rel(hs[name], ref[name]) <= 1e-5, name


def test_fixture_sharded_checkpoint(fixture_model, tokens):
  parts = os.path.join(os.path.dirname(FIX), "vortex_tiny_parts")
  model = from_vortex(os.path.join(parts, "state_dict.pt"), os.path.join(parts, "config.yml"))
  np.testing.assert_array_equal(np.asarray(model(tokens[:, :50])),
                                np.asarray(fixture_model(tokens[:, :50])))


def test_causality():
  model = StripedHyena(ModelConfig(num_layers=4), rngs=nnx.Rngs(0))
  t = jax.random.randint(jax.random.key(0), (2, 41), 0, 256)
  t2 = t.at[:, 30:].set(7)
  a, b = model(t), model(t2)
  np.testing.assert_allclose(np.asarray(a[:, :30]), np.asarray(b[:, :30]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(a[:, 30:]), np.asarray(b[:, 30:]))


def test_bf16_compute_keeps_f32_params():
  cfg = ModelConfig(num_layers=4, dtype="bfloat16")
  model = StripedHyena(cfg, rngs=nnx.Rngs(0))
  ref = StripedHyena(ModelConfig(num_layers=4), rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  t = jax.random.randint(jax.random.key(1), (2, 33), 0, 256)
  out, out32 = model(t), ref(t)
  assert out.dtype == jnp.float32
  assert rel(out, out32) < 3e-2


def test_layouts():
  assert resolve_layout("SE-MR-LI-MHA", 6) == ("SE", "MR", "LI", "MHA", "SE", "MR")
  assert resolve_layout(None, 3, {"SE": (0, 2), "MHA": (1,)}) == ("SE", "MHA", "SE")
  assert get_preset("evo2_40b").layer_types[32:37] == ("SE", "MR", "LI", "MHA", "SE")
  assert [i for i, t in enumerate(get_preset("evo2_7b").layer_types) if t == "MHA"] == [3, 10, 17, 24, 31]


@pytest.mark.parametrize("kwargs,message", [
    (dict(layout="SE-XX"), "layout 'SE-XX' has unknown op 'XX'; expected one of SE, MR, LI, MHA"),
    (dict(layout=""), "layout '' is empty"),
    (dict(layout="SE--MR"), "unknown op ''"),
    (dict(num_heads=3, d_model=64), "num_heads 3 is not valid; expected a divisor of d_model 64"),
    (dict(se_groups=5), "se_groups 5 is not valid; expected a divisor of d_model 64"),
    (dict(mr_groups=0), "mr_groups 0 is not valid; expected a positive integer"),
    (dict(num_layers=0), "num_layers 0 must be a positive integer"),
    (dict(layer_idxs=(("SE", (0, 1)), ("MHA", (1,)))), "layer 1 is listed as both SE and MHA"),
    (dict(layer_idxs=(("SE", (0,)),), num_layers=2), r"layers \[1\] have no type"),
    (dict(layer_idxs=(("XX", (0,)),)), r"unknown op\(s\) \['XX'\]"),
    (dict(conv_impl="cuda"), "conv_impl 'cuda' is not valid; expected one of auto, pallas"),
    (dict(dtype="float8"), "dtype 'float8' is not valid"),
])
def test_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**kwargs)


def test_unknown_config_key():
  with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['hidden'\]"):
    ModelConfig.from_dict({"hidden": 3})
  with pytest.raises(ValueError, match="unknown preset 'evo3'"):
    get_preset("evo3")


def test_bad_tokens():
  model = StripedHyena(ModelConfig(num_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]; got shape \(5,\)"):
    model(jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="tokens must be integers"):
    model(jnp.zeros((1, 5), jnp.float32))


def test_preset_summaries_without_weights():
  # Abstract evaluation: the 40B summary costs no memory.
  counts = {}
  for name in PRESETS:
    text = summary(get_preset(name), 8192)
    counts[name] = int(text.splitlines()[0].split(": ")[1].replace(",", ""))
  assert 1.0e9 < counts["evo2_1b_base"] < 1.2e9
  assert 6.3e9 < counts["evo2_7b"] < 6.7e9
  assert 19e9 < counts["evo2_20b"] < 21e9
  assert 39e9 < counts["evo2_40b"] < 42e9
