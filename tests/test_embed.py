"""sh2_jax.embed: activations at every named point equal the forward pass's intermediates."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sh2_jax
from sh2_jax.embed import embed, embed_sequences, mean_pool, named_points
from sh2_jax.blocks import AttentionBlock
from sh2_jax.modes import FULL
from sh2_jax.ops import fir


def manual_intermediates(model, tokens):
  """Walk the model by hand, recording what each reference module path outputs."""
  out = {}
  x = out["embedding_layer"] = model.embedding_layer(tokens)
  for i, b in enumerate(model.blocks):
    p = f"blocks.{i}."
    h = out[p + "pre_norm"] = b.pre_norm(x)
    if isinstance(b, AttentionBlock):
      att = b.inner_mha_cls
      qkv = out[p + "inner_mha_cls.Wqkv"] = att.Wqkv(h)
      del qkv
      y = out[p + "inner_mha_cls"] = att(h)[0]
      out[p + "inner_mha_cls.out_proj"] = y
    else:
      z = out[p + "projections"] = b.projections(h)
      x2, x1, v = fir.interleaved_split(fir.featurizer_conv(z, b.filter.featurizer_taps()))
      f = out[p + "filter"] = b.filter._inner(x1, v, x2, FULL, None)[0]
      y = out[p + "out_filter_dense"] = b.out_filter_dense(f)
    zres = x + y
    hp = out[p + "post_norm"] = b.post_norm(zres)
    out[p + "mlp.l1"] = b.mlp.l1(hp)
    out[p + "mlp.l2"] = b.mlp.l2(hp)
    m = out[p + "mlp"] = b.mlp(hp)
    out[p + "mlp.l3"] = m
    x = out[f"blocks.{i}"] = zres + m
  out["norm"] = model.norm(x)
  return out


def test_every_named_point_matches_forward():
  cfg = sh2_jax.ModelConfig(d_model=32, num_layers=4, num_heads=2, mlp_hidden=48, se_groups=4,
                            mr_groups=4, mr_len=16)
  model = sh2_jax.StripedHyena(cfg, rngs=nnx.Rngs(3))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 29)), jnp.int32)
  ref = manual_intermediates(model, tokens)
  names = named_points(model)
  assert set(ref) == set(names)
  got = embed(model, tokens, names)
  for n in names:
    np.testing.assert_allclose(np.asarray(got[n]), np.asarray(ref[n]), rtol=2e-5, atol=2e-5,
                               err_msg=n)
  # The mlp.l1 of layer 0 is before the erf-GELU: distinct from what feeds l3.
  assert not np.allclose(np.asarray(got["blocks.0.mlp.l1"]), np.asarray(got["blocks.0.mlp.l2"]))


def test_pooling_and_batches():
  cfg = sh2_jax.ModelConfig(d_model=32, num_layers=2, layout="SE-MHA", num_heads=2,
                            mlp_hidden=48, se_groups=4, mr_groups=4)
  model = sh2_jax.StripedHyena(cfg, rngs=nnx.Rngs(0))
  seqs = ["ACGTACGTAC", "ACG", "TTTTTTT"]
  pooled = embed_sequences(model, seqs, "blocks.1.mlp.l3", batch_size=2, progress=False)
  for i, s in enumerate(seqs):
    alone = embed(model, jnp.asarray(np.frombuffer(s.encode(), np.uint8)[None].astype(np.int32)),
                  ["blocks.1.mlp.l3"])["blocks.1.mlp.l3"]
    np.testing.assert_allclose(pooled[i], np.asarray(alone[0].mean(0)), rtol=1e-4, atol=1e-5)
  acts = jnp.ones((2, 4, 3)).at[1, 2:].set(100.0)
  np.testing.assert_allclose(np.asarray(mean_pool(acts, jnp.asarray([4, 2]))), 1.0)
  with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['blocks.7.mlp'\]"):
    embed(model, jnp.ones((1, 3), jnp.int32), ["blocks.7.mlp"])
  with pytest.raises(ValueError, match="sequence 0 has 10 tokens > max_len 5"):
    embed_sequences(model, seqs, "blocks.0", max_len=5, progress=False)


def test_segmented_embed_equals_one_shot():
  """``embed(..., segment_len=S)`` runs the segmented forward (state carried between segments)
  and returns the one-shot activations at every named point (float32, relative <= 1e-5)."""
  cfg = sh2_jax.ModelConfig(d_model=32, num_layers=4, num_heads=2, mlp_hidden=48, se_groups=4,
                            mr_groups=4, mr_len=16)
  model = sh2_jax.StripedHyena(cfg, rngs=nnx.Rngs(5))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 45)), jnp.int32)
  names = named_points(model)
  ref = embed(model, tokens, names)
  got = sh2_jax.embed(model, tokens, names, segment_len=16)  # 16 + 16 + 13
  for n in names:
    a, b = np.asarray(got[n], np.float64), np.asarray(ref[n], np.float64)
    assert a.shape == b.shape, n
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), n
