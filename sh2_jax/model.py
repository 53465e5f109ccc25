"""The StripedHyena 2 stack.

tokens [B, L] int32 -> embed -> blocks (pre-norm, two residuals) -> RMSNorm -> logits [B, L, V]
(tied embedding, float32 logits). Module paths follow the reference checkpoint
(``embedding_layer``, ``blocks.N.{pre_norm,post_norm,projections,filter,out_filter_dense,mlp}``,
``blocks.N.inner_mha_cls``, ``norm``), so names used with the reference work here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sh2_jax import capture
from sh2_jax.attention import Attention
from sh2_jax.config import ModelConfig
from sh2_jax.hyena import HyenaFilter, hyena_forward
from sh2_jax.layers import MLP, Dense, RMSNorm, small_init, wang_init


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm:
  return RMSNorm(cfg.d_model, eps=cfg.eps, dtype=jnp.dtype(cfg.dtype),
                 param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _mlp(index: int, cfg: ModelConfig, rngs: nnx.Rngs) -> MLP:
  if cfg.evo2_style_activations:
    activation = "gelu" if index == 0 else "identity"
  else:
    activation = cfg.mlp_activation
  return MLP(cfg.d_model, cfg.mlp_hidden, activation=activation, num_layers=cfg.num_layers,
             dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class HyenaBlock(nnx.Module):
  """SE, MR or LI block: ``z = u + Hyena(pre_norm(u))``, ``y = z + mlp(post_norm(z))``."""

  def __init__(self, index: int, op: str, cfg: ModelConfig, rngs: nnx.Rngs):
    d, dt, pdt = cfg.d_model, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.op = op
    self.pre_norm = _norm(cfg, rngs)
    self.post_norm = _norm(cfg, rngs)
    self.projections = Dense(d, 3 * d, use_bias=False, init=small_init(d), dtype=dt,
                             param_dtype=pdt, rngs=rngs, fp8=cfg.fp8_projections)
    self.filter = HyenaFilter(op, cfg, rngs)
    self.out_filter_dense = Dense(d, d, use_bias=cfg.hyena_out_bias,
                                  init=wang_init(d, cfg.num_layers), dtype=dt, param_dtype=pdt,
                                  rngs=rngs)
    self.mlp = _mlp(index, cfg, rngs)

  def mix(self, x: jax.Array) -> jax.Array:
    return hyena_forward(self.projections, self.filter, self.out_filter_dense, x)

  def __call__(self, u: jax.Array) -> jax.Array:
    return residual_block(self, u)


class AttentionBlock(nnx.Module):
  """MHA block: ``z = u + MHA(pre_norm(u))``, ``y = z + mlp(post_norm(z))``."""

  def __init__(self, index: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.op = "MHA"
    self.pre_norm = _norm(cfg, rngs)
    self.post_norm = _norm(cfg, rngs)
    self.inner_mha_cls = Attention(cfg, rngs)
    self.mlp = _mlp(index, cfg, rngs)

  def mix(self, x: jax.Array) -> jax.Array:
    return self.inner_mha_cls(x)

  def __call__(self, u: jax.Array) -> jax.Array:
    return residual_block(self, u)


def residual_block(block, u: jax.Array, mix=None) -> jax.Array:
  """``z = u + mix(pre_norm(u))``, ``y = z + mlp(post_norm(z))``; ``mix`` defaults to the
  block's own mixer (the decoding path passes its cache-filling / recurrent mixers)."""
  z = u + (mix or block.mix)(block.pre_norm(u))
  return capture.record(block, z + block.mlp(block.post_norm(z)))


def make_block(index: int, op: str, cfg: ModelConfig, rngs: nnx.Rngs):
  if op == "MHA":
    return AttentionBlock(index, cfg, rngs)
  return HyenaBlock(index, op, cfg, rngs)


class Embedding(nnx.Module):
  """``embedding_layer``: weight [V, D], used for the input lookup and the tied unembedding."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.weight = nnx.Param(
        jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                         jnp.dtype(cfg.param_dtype)),
        out_sharding=(None, "fsdp"), eager_sharding=False)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return capture.record(self, jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype))

  def unembed(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.weight[...].astype(self.dtype).T,
                   preferred_element_type=jnp.float32)


class StripedHyena(nnx.Module):
  """A StripedHyena 2 language model. ``model(tokens [B, L]) -> logits [B, L, V]`` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding_layer = Embedding(cfg, rngs)
    self.blocks = nnx.List([make_block(i, op, cfg, rngs)
                            for i, op in enumerate(cfg.layer_types)])
    self.norm = _norm(cfg, rngs)

  def check_tokens(self, tokens) -> None:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length]; got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}")

  def __call__(self, tokens: jax.Array) -> jax.Array:
    self.check_tokens(tokens)
    x = self.embedding_layer(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embedding_layer.unembed(self.norm(x))

  def hidden_states(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """The residual stream at every stage: ``embedding``, ``block_i``, ``final_norm``."""
    self.check_tokens(tokens)
    out = {}
    x = out["embedding"] = self.embedding_layer(tokens)
    for i, block in enumerate(self.blocks):
      x = out[f"block_{i}"] = block(x)
    out["final_norm"] = self.norm(x)
    return out
