"""The forward pass over very long sequences in segments, carrying the recurrent state.

A sequence of L tokens is cut into segments of S; each segment runs the one forward in
``Segment`` mode, continued from the ``Cache`` the previous segments left (the same cache
decoding uses), so peak activation memory is that of S tokens, not L. Per mixer:
  featurizer, SE, MR  the cached last inputs are prepended, the convolution runs over
                      [history; segment] (through the configured implementation: Pallas on
                      GPU) and the history outputs are dropped;
  LI                  the segment's own convolution from a zero state, plus the response of
                      the carried modal state (``ops.modal.state_response``); the state
                      advances as ``s <- exp(lambda S) s + modal_state(u)``;
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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sh2_jax import capture
from sh2_jax.inference.cache import Cache, KVCache, cache_shapes, init_cache
from sh2_jax.modes import CONTEXT_AXIS, Segment, ShardedKV
from sh2_jax.ops.loss import token_loglik


def forward_segment(model, cache: Cache, tokens: jax.Array, kv: ShardedKV | None = None):
  """tokens [B, S] continuing every row at position ``cache.lengths[0]`` -> (logits
  [B, S, V] float32, the advanced Cache). With ``kv``, the KV caches are laid out as it says
  and the segment must lie inside one of its blocks."""
  return model.forward(tokens, Segment(cache.lengths[0], kv), cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "head", "kv", "layers"),
                   donate_argnums=(2,))
def _segment_step(graphdef, state, cache, tokens, next_first, head, kv=None, layers=()):
  """One segment: (head's result, the advanced cache); with ``layers`` (module paths) the
  result is (head's result, {path: the segment's activations})."""
  model = nnx.merge(graphdef, state)
  if not layers:
    logits, cache = forward_segment(model, cache, tokens, kv)
    return head(logits, tokens, next_first), cache
  (logits, cache), acts = capture.run(forward_segment, model, cache, tokens, kv)
  return (head(logits, tokens, next_first), {n: acts[n] for n in layers if n in acts}), cache


def _logits_head(logits, tokens, next_first):
  return logits


def last_logits_head(logits, tokens, next_first):
  """The logits of each segment's last position ([B, V]): a prompt's next-token logits."""
  return logits[:, -1]


def _loglik_head(logits, tokens, next_first):
  """log p(token t+1 | ..t) for the segment's positions; the last uses the next segment's
  first token (``next_first`` [B], -1 when there is none: then garbage, dropped later)."""
  nxt = jnp.concatenate([tokens[:, 1:], jnp.maximum(next_first, 0)[:, None]], axis=1)
  return token_loglik(logits, nxt)


def _nothing_head(logits, tokens, next_first):
  return ()


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
                    max_len: int | None = None, mesh=None, axis: str = CONTEXT_AXIS,
                    layers: tuple[str, ...] = ()):
  """Run ``tokens`` [B, L] in segments of ``segment_len``; returns (list of per-segment
  ``head(logits, tokens, next_first)`` results as numpy, final Cache). The last segment may be
  shorter (one more compilation). ``mesh``: shard the KV cache by position over its ``axis``
  in blocks of ``segment_len`` (``ShardedKV``); the model's parameters are replicated onto it.
  ``layers``: module paths whose activations each segment also returns (then each list item
  is (head's result, {path: activations [B, S, ...]}))."""
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
    out, cache = _segment_step(graphdef, state, cache, seg, nxt, head, kv, tuple(layers))
    outs.append(jax.tree.map(np.asarray, out))
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


def segmented_activations(model, tokens, segment_len: int, layers, mesh=None) -> dict:
  """Activations [B, L, ...] at the module paths ``layers``, computed segment by segment."""
  outs, _ = segmented_apply(model, tokens, segment_len, head=_nothing_head, mesh=mesh,
                            layers=tuple(layers))
  return {n: np.concatenate([acts[n] for _, acts in outs], axis=1) for n in layers
          if n in outs[0][1]}
