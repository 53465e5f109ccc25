"""The StripedHyena 2 stack, and the one walk over its blocks.

tokens [B, L] int32 -> embed -> blocks (pre-norm, two residuals) -> RMSNorm -> logits [B, L, V]
(tied embedding, float32 logits). ``StripedHyena.forward(tokens, mode, cache)`` is the one
forward: every mode of ``sh2_jax.modes`` (full sequence, prefill, decode, segment, context
parallel) walks the blocks here and only here; rematerialisation and the per-block FSDP gather
are options of that walk. Module paths follow the reference checkpoint (``embedding_layer``,
``blocks.N.{pre_norm,post_norm,projections,filter,out_filter_dense,mlp}``,
``blocks.N.inner_mha_cls``, ``norm``), so names used with the reference work here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import capture
from sh2_jax.blocks import make_block, norm
from sh2_jax.config import REMAT_MODES, ModelConfig
from sh2_jax.layers import Dense
from sh2_jax.modes import FULL, Cache, Prefill, last_steps
from sh2_jax.sharding import gather_params

_REMAT_POLICIES = {"blocks": None,
                   "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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


def _through(module: nnx.Module, fn, *args, remat: str = "none", spec=None):
  """``fn(module, *args)``, optionally with the module's parameters all-gathered first
  (``spec``: their PartitionSpecs, inside shard_map) and/or rematerialised (``remat``:
  ``blocks`` recomputes the whole call in the backward pass, ``dots`` keeps the matmul outputs).
  What the call records is recorded into ``module`` as if called directly."""
  if remat == "none" and spec is None:
    return fn(module, *args)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def step(params, rest, *args):
    full = params if spec is None else gather_params(params, spec)
    return capture.run_inner(fn, nnx.merge(graphdef, full, rest), *args)

  if remat != "none":
    step = jax.checkpoint(step, policy=_REMAT_POLICIES[remat])
  out, inter = step(params, rest, *args)
  capture.resow(module, inter)
  return out


class StripedHyena(nnx.Module):
  """A StripedHyena 2 language model. ``model(tokens [B, L]) -> logits [B, L, V]`` (float32);
  ``model.forward(tokens, mode, cache) -> (logits, cache)`` for every other mode."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding_layer = Embedding(cfg, rngs)
    self.blocks = nnx.List([make_block(i, op, cfg, rngs)
                            for i, op in enumerate(cfg.layer_types)])
    self.norm = norm(cfg, rngs)

  def check_tokens(self, tokens) -> None:
    """Shape and dtype always; the ids themselves when they are concrete (not traced): every
    driver calls this first, so an id outside the vocabulary is an error, not NaN output."""
    if not hasattr(tokens, "ndim") or not hasattr(tokens, "dtype"):
      raise ValueError(f"tokens must be an integer array [batch, length]; got a "
                       f"{type(tokens).__name__}")
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length]; got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}")
    if tokens.shape[1] == 0:
      raise ValueError("tokens are empty (length 0); give at least one token per row")
    if not isinstance(tokens, jax.core.Tracer):
      ids = np.asarray(tokens)
      lo, hi = int(ids.min()), int(ids.max())
      if lo < 0 or hi >= self.cfg.vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                         f"0..{self.cfg.vocab_size - 1}")

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty cache (all rows at position 0), each layer's from its own mixer."""
    return Cache(jnp.zeros((batch,), jnp.int32),
                 tuple(block.init_cache(batch, max_len) for block in self.blocks))

  def forward(self, tokens: jax.Array, mode=FULL, cache: Cache | None = None, *,
              remat: str = "none", param_specs=None):
    """The one walk over the blocks: tokens [B, L] -> (logits [B, L, V] float32, new Cache or
    None). ``Prefill`` returns the logits at each row's last token only ([B, 1, V]).

    remat: one of ``config.REMAT_MODES`` (``none``, ``blocks``, ``dots``), per block.
    param_specs: inside shard_map, the PartitionSpecs (``sharding.fsdp_specs``) of this model's
    ``nnx.Param`` state, which then holds this rank's shards: each block gathers its own
    parameters when it runs (inside its rematerialised step, so the backward gathers again and
    gradients leave reduce-scattered): one block's parameters live at a time (ZeRO-3).
    """
    if remat not in REMAT_MODES:
      raise ValueError(f"remat {remat!r} is not one of {', '.join(REMAT_MODES)}")
    self.check_tokens(tokens)
    spec = (lambda name: None) if param_specs is None else (lambda name: param_specs[name])
    embed = lambda m, t: m(t)
    x = _through(self.embedding_layer, embed, tokens, spec=spec("embedding_layer"))
    layers = []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache.layers[i]
      step = lambda m, x_, c_: m(x_, mode, c_)
      block_spec = None if param_specs is None else param_specs["blocks"][i]
      x, layer_cache = _through(block, step, x, layer_cache, remat=remat, spec=block_spec)
      layers.append(layer_cache)
    if isinstance(mode, Prefill):
      x = last_steps(x, mode.lengths, 1)                       # [B, 1, D]
    x = _through(self.norm, lambda m, x_: m(x_), x, spec=spec("norm"))
    logits = _through(self.embedding_layer, lambda m, x_: m.unembed(x_), x,
                      spec=spec("embedding_layer"))
    if cache is None:
      return logits, None
    lengths = mode.lengths if isinstance(mode, Prefill) else cache.lengths + tokens.shape[1]
    return logits, Cache(lengths, tuple(layers))

  def with_compute_dtype_weights(self) -> "StripedHyena":
    """A copy whose matrices -- every ``Dense`` kernel and the embedding, the weights that are
    only ever read through ``.astype(compute dtype)`` -- are stored in the compute dtype: the
    same outputs bit for bit, and a decoding loop streams those weights at 2 bytes instead of
    re-reading float32 ones each token (it holds both copies meanwhile). Norm scales, filters,
    poles and biases keep their dtype (they are used in float32)."""
    model = nnx.clone(self)
    for _, module in nnx.iter_graph(model):
      weight = (module.kernel if isinstance(module, Dense) else
                module.weight if isinstance(module, Embedding) else None)
      if weight is not None:
        weight.set_value(weight.get_value().astype(module.dtype))
    return model

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] -> logits [B, L, V] float32 (the full-sequence forward)."""
    return self.forward(tokens)[0]

  def hidden_states(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """The residual stream at every stage: ``embedding``, ``block_i``, ``final_norm``."""
    names = {"embedding_layer": "embedding",
             **{f"blocks.{i}": f"block_{i}" for i in range(len(self.blocks))},
             "norm": "final_norm"}
    _, out = capture.run(lambda m, t: m(t), self, tokens)
    return {new: out[old] for old, new in names.items()}
