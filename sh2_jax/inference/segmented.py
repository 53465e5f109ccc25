"""The forward pass over very long sequences in segments, carrying the recurrent state.

A sequence of L tokens is cut into segments of S; each segment runs the parallel forward of
every layer, continued from the ``Cache`` the previous segments left (the same cache decoding
uses), so peak activation memory is that of S tokens, not L:
  featurizer, SE, MR  the cached last inputs are prepended, the convolution runs over
                      [history; segment] (through the configured implementation: Pallas on
                      GPU) and the history outputs are dropped;
  LI                  the segment's own convolution from a zero state, plus the response of
                      the carried modal state, ``y_state[t] = sum_n R_n exp(lambda_n (t+1)) s_n``;
                      the state advances as ``s <- exp(lambda S) s + modal_state(u)``;
  MHA                 the segment's keys/values are written into the KV cache; its queries
                      attend to the earlier keys (one block) and to themselves (a causal
                      block), merged through their log-sum-exps.
All rows of the batch move together (same length). The result equals the one-shot forward.

Over a device mesh (``mesh=``, its ``context`` axis of N ranks) the KV cache -- the only state
that grows with L -- is sharded by position (``ShardedKV``): blocks of S positions are dealt
round-robin, block g to rank g mod N at its local slot g // N, so every rank holds an equal share
of the earlier keys whatever the offset (the cache is padded to a multiple of N*S). Each rank
attends the segment's queries to its visible keys (a contiguous prefix of its shard); the N
partial results are merged by their log-sum-exps (pmax, psum), and the rank owning the
segment's block writes its keys/values. Everything else (weights, the segment's activations,
the small Hyena caches) is replicated, so per-device memory is the weights plus 1/N of the KV
cache, and the prefix attention -- the cost that grows with L -- is split N ways evenly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sh2_jax import conv, dispatch
from sh2_jax.attention import resolve_attention_impl
from sh2_jax.hyena import featurize
from sh2_jax.inference.cache import Cache, HyenaCache, KVCache, cache_shapes, init_cache
from sh2_jax.parallel.attention import block_attention, merge, merge_across

CONTEXT_AXIS = "context"


@dataclasses.dataclass(frozen=True)
class ShardedKV:
  """The KV cache sharded by position over ``axis`` of ``mesh``: blocks of ``stripe``
  positions, block g on rank g mod N at local slot g // N. A segment (or decoded token) must
  not straddle two blocks: segments of ``stripe`` tokens starting at multiples of it do not."""

  mesh: Mesh
  stripe: int
  axis: str = CONTEXT_AXIS

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]


def _with_history(hist: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.concatenate([hist.astype(x.dtype), x], axis=1)


def _hyena_segment(block, h, cache: HyenaCache):
  filt = block.filter
  z = block.projections(h)                                     # [B, S, 3D]
  k0 = cache.z_hist.shape[1]
  z_ext = _with_history(cache.z_hist, z)
  x2, x1, v = featurize(z_ext, filt.featurizer_taps())
  x2, x1, v = x2[:, k0:], x1[:, k0:], v[:, k0:]
  u = x1 * v
  dskip = None if filt.D is None else filt.D[...]
  if filt.op == "LI":
    lam, res = filt.log_poles(), filt.residues[...]
    y = dispatch.gated_modal(x1, v, x2, lam, res, dskip, filt.cfg.li_impl)
    s = u.shape[1]
    weights = (res.astype(jnp.float32) * jnp.exp(lam))[None] * cache.state  # [B, D, N]
    t = jnp.arange(s, dtype=jnp.float32)[None, :, None]
    y_state = conv.modal_sum(lam, weights[:, None], t)                      # [B, S, D]
    y = (y.astype(jnp.float32) + x2.astype(jnp.float32) * y_state).astype(y.dtype)
    state = jnp.exp(lam * s)[None] * cache.state + conv.modal_state(u, lam)
  else:
    # [u_hist; u] through the gate with x1 := [u_hist; x1], v := [1; v], x2 := [0; x2], so
    # the configured kernel runs unchanged; the history rows are dropped.
    hist = cache.state
    ones, zeros = jnp.ones_like(hist, v.dtype), jnp.zeros_like(hist, x2.dtype)
    y = dispatch.gated_fir(_with_history(hist, x1), _with_history(ones, v),
                           _with_history(zeros, x2), filt.fir_taps(), dskip,
                           filt.cfg.conv_impl)[:, hist.shape[1]:]
    state = _with_history(hist, u)[:, -hist.shape[1]:] if hist.shape[1] else hist
  new = HyenaCache(z_ext[:, -k0:] if k0 else cache.z_hist, state.astype(cache.state.dtype))
  return block.out_filter_dense(y), new


def _prefix_and_write(q, k, v, cache: KVCache, offset, scale, impl):
  """Attention of the segment's queries to the cached keys before ``offset``, and the cache
  with the segment's keys/values written at ``offset``."""
  b = q.shape[0]
  # Write first, then read the written cache up to ``offset`` (the new keys sit past it): the
  # update is then the cache's only use and happens in place (read-then-write made XLA copy
  # the whole cache each segment).
  new = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k, offset, axis=1),
                jax.lax.dynamic_update_slice_in_dim(cache.v, v, offset, axis=1))
  prefix = block_attention(q, new.k, new.v, jnp.full((b,), offset, jnp.int32), False,
                           scale, impl)
  return prefix, new


def _sharded_prefix_and_write(q, k, v, cache: KVCache, offset, scale, impl, kv: ShardedKV):
  """``_prefix_and_write`` with the cache laid out as ``kv`` says."""
  n, stripe = kv.size, kv.stripe

  def local(q, k, v, kc, vc, offset):
    b, s = q.shape[:2]
    r = jax.lax.axis_index(kv.axis)
    g, within = offset // stripe, offset % stripe        # the segment's block, its place in it
    full = jnp.maximum(g - r + n - 1, 0) // n            # earlier blocks this rank holds
    mine = g % n == r
    visible = jnp.full((b,), full * stripe + jnp.where(mine, within, 0), jnp.int32)
    at = jnp.clip((g // n) * stripe + within, 0, kc.shape[1] - s)

    def write(c, x):  # first, so that it happens in place (see _prefix_and_write)
      old = jax.lax.dynamic_slice_in_dim(c, at, s, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(mine, x, old), at, axis=1)

    kc, vc = write(kc, k), write(vc, v)                  # the new keys sit past ``visible``
    out, lse = merge_across(block_attention(q, kc, vc, visible, False, scale, impl), kv.axis)
    return out, lse, kc, vc

  seq = P(None, kv.axis)
  out, lse, kc, vc = jax.shard_map(
      local, mesh=kv.mesh, in_specs=(P(), P(), P(), seq, seq, P()),
      out_specs=(P(), P(), seq, seq))(q, k, v, cache.k, cache.v, offset)
  return (out, lse), KVCache(kc, vc)


def _attention_segment(block, h, cache: KVCache, offset, kv: ShardedKV | None = None):
  attn = block.inner_mha_cls
  b, s, _ = h.shape
  q, k, v = attn.qkv(h, offset + jnp.arange(s))
  impl = resolve_attention_impl(attn.impl, attn.dtype)
  scale = attn.head_dim ** -0.5
  if kv is None:
    prefix, new = _prefix_and_write(q, k, v, cache, offset, scale, impl)
  else:
    prefix, new = _sharded_prefix_and_write(q, k, v, cache, offset, scale, impl, kv)
  diag = block_attention(q, k, v, None, True, scale, impl)
  o = merge(prefix, diag)[0].astype(q.dtype)
  return attn.out_proj(o.reshape(b, s, -1)), new


def forward_segment(model, cache: Cache, tokens: jax.Array, kv: ShardedKV | None = None):
  """tokens [B, S] continuing every row at position ``cache.lengths[0]`` -> (logits
  [B, S, V] float32, the advanced Cache). With ``kv``, the KV caches are laid out as it says
  and the segment must lie inside one of its blocks."""
  offset = cache.lengths[0]
  x = model.embedding_layer(tokens)
  layers = []
  for block, layer_cache in zip(model.blocks, cache.layers):
    h = block.pre_norm(x)
    if block.op == "MHA":
      mixed, layer_cache = _attention_segment(block, h, layer_cache, offset, kv)
    else:
      mixed, layer_cache = _hyena_segment(block, h, layer_cache)
    x = x + mixed
    x = x + block.mlp(block.post_norm(x))
    layers.append(layer_cache)
  logits = model.embedding_layer.unembed(model.norm(x))
  return logits, Cache(cache.lengths + tokens.shape[1], tuple(layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "head", "kv"), donate_argnums=(2,))
def _segment_step(graphdef, state, cache, tokens, next_first, head, kv=None):
  model = nnx.merge(graphdef, state)
  logits, cache = forward_segment(model, cache, tokens, kv)
  return head(logits, tokens, next_first), cache


def _logits_head(logits, tokens, next_first):
  return logits


def last_logits_head(logits, tokens, next_first):
  """The logits of each segment's last position ([B, V]): a prompt's next-token logits."""
  return logits[:, -1]


def _loglik_head(logits, tokens, next_first):
  """log p(token t+1 | ..t) for the segment's positions; the last uses the next segment's
  first token (``next_first`` [B], -1 when there is none: then NaN, dropped later)."""
  nxt = jnp.concatenate([tokens[:, 1:], jnp.maximum(next_first, 0)[:, None]], axis=1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ll = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  return ll


def sharded_kv(mesh, segment_len: int, axis: str = CONTEXT_AXIS) -> ShardedKV:
  """The ``ShardedKV`` of segments of ``segment_len`` over ``axis`` of ``mesh`` (checked)."""
  if axis not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no {axis!r} axis to shard the KV "
                     "cache over")
  return ShardedKV(mesh, segment_len, axis)


def mesh_cache(cfg, batch: int, max_len: int, kv: ShardedKV) -> Cache:
  """An empty cache laid out as ``kv`` says (length padded to a multiple of N*stripe), the rest
  replicated on its mesh; built in place, never whole on one device."""
  step = kv.size * kv.stripe
  shapes = cache_shapes(cfg, batch, -(-max_len // step) * step)
  seq = NamedSharding(kv.mesh, P(None, kv.axis))
  rep = NamedSharding(kv.mesh, P())
  shardings = Cache(rep, tuple(KVCache(seq, seq) if isinstance(c, KVCache)
                               else jax.tree.map(lambda _: rep, c) for c in shapes.layers))
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.jit(zeros, out_shardings=shardings)()


def segmented_apply(model, tokens, segment_len: int, head=_logits_head,
                    max_len: int | None = None, mesh=None, axis: str = CONTEXT_AXIS):
  """Run ``tokens`` [B, L] in segments of ``segment_len``; returns (list of per-segment
  ``head(logits, tokens, next_first)`` results as numpy, final Cache). The last segment may be
  shorter (one more compilation). ``mesh``: shard the KV cache by position over its ``axis``
  in blocks of ``segment_len`` (``ShardedKV``); the model's parameters are replicated onto it."""
  tokens = np.asarray(tokens)
  model.check_tokens(tokens)
  if not isinstance(segment_len, int) or segment_len < 1:
    raise ValueError(f"segment_len {segment_len!r} must be a positive integer")
  b, length = tokens.shape
  graphdef, state = nnx.split(model)
  kv = None if mesh is None else sharded_kv(mesh, segment_len, axis)
  if kv is None:
    cache = init_cache(model.cfg, b, max_len or length)
  else:
    cache = mesh_cache(model.cfg, b, max_len or length, kv)
    state = jax.device_put(state, NamedSharding(mesh, P()))
  outs = []
  for start in range(0, length, segment_len):
    seg = jnp.asarray(tokens[:, start:start + segment_len], jnp.int32)
    end = start + seg.shape[1]
    nxt = jnp.asarray(tokens[:, end] if end < length else np.full((b,), -1), jnp.int32)
    out, cache = _segment_step(graphdef, state, cache, seg, nxt, head, kv)
    outs.append(np.asarray(out))
  return outs, cache


def segmented_logits(model, tokens, segment_len: int, mesh=None) -> np.ndarray:
  """Logits [B, L, V] of the whole sequence, computed segment by segment."""
  outs, _ = segmented_apply(model, tokens, segment_len, mesh=mesh)
  return np.concatenate(outs, axis=1)


def segmented_score(model, tokens, segment_len: int, mesh=None) -> np.ndarray:
  """Per-token log-likelihoods [B, L-1] (as ``sh2_jax.score``) without ever holding more than
  one segment's activations or logits on the device."""
  outs, _ = segmented_apply(model, tokens, segment_len, head=_loglik_head, mesh=mesh)
  return np.concatenate(outs, axis=1)[:, :-1]
