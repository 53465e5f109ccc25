"""``generate``: prefill the prompts, then decode token by token inside one compiled loop.

Prompts of different lengths are right-padded into one batch (each row equals that row run
alone, see ``prefill``); the loop stops early once every row has produced a stop token.
With ``mesh`` (a device mesh with a ``context`` axis) the prompt is prefilled in segments and
the KV cache stays sharded by position over the context ranks while decoding (see
``segmented``): long prompts whose cache does not fit one device.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sh2_jax import checks
from sh2_jax.inference.decode import decode_step
from sh2_jax.inference.prefill import prefill
from sh2_jax.inference.sampling import check_sampling, sample
from sh2_jax.inference.segmented import (forward_segment, last_logits_head, segmented_apply,
                                         sharded_kv)
from sh2_jax.tokenizer import PAD_ID

PROMPT_BUCKET = 64  # prompt batches are padded to a multiple of this: fewer recompilations


def as_token_rows(tokens, vocab_size: int,
                  what: str = "prompt") -> tuple[list[np.ndarray], bool]:
  """A prompt (1-D ids), a batch [B, L], or a list of 1-D id sequences -> (rows, single);
  errors call a row ``what`` (e.g. 'sequence' when scoring)."""
  if isinstance(tokens, (str, bytes)):
    raise TypeError("prompts are token ids; turn text into ids with sh2_jax.tokenizer.encode")
  if isinstance(tokens, (np.ndarray, jax.Array)):
    arr = np.asarray(tokens)
    if arr.ndim not in (1, 2):
      raise ValueError(f"{what} tokens must be [L] or [B, L]; got shape {arr.shape}")
    single = arr.ndim == 1
    rows = [arr] if single else list(arr)
  else:
    seq = list(tokens)
    single = bool(seq) and all(isinstance(t, (int, np.integer)) for t in seq)
    rows = [np.asarray(seq)] if single else [np.asarray(r) for r in seq]
  if not rows:
    raise ValueError(f"no {what}s given")
  for i, r in enumerate(rows):
    if r.ndim != 1 or r.size == 0:
      raise ValueError(f"{what} {i} must be a non-empty 1-D sequence of ids; got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
      raise ValueError(f"{what} {i} has dtype {r.dtype}; token ids must be integers")
  checks.token_ids(rows, [f"{what} {i}" for i in range(len(rows))], vocab_size)
  return [r.astype(np.int32) for r in rows], single


def pad_rows(rows: Sequence[np.ndarray], bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad with PAD_ID to a multiple of ``bucket``: (tokens [B, L], lengths [B])."""
  lengths = np.array([len(r) for r in rows], np.int32)
  length = -(-int(lengths.max()) // bucket) * bucket
  out = np.full((len(rows), length), PAD_ID, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, lengths


def length_batches(rows: Sequence[np.ndarray], batch_size: int | None, bucket: int = 1):
  """Yield (indices, tokens [n, L], lengths [n]): ``rows`` sorted by length and cut into
  batches of ``batch_size`` (None: one batch of all), each right-padded to a multiple of
  ``bucket``, so each batch pads little and few shapes compile. When there is more than one
  batch the last is filled up to ``batch_size`` with one-token PAD rows (same shape, no extra
  compilation); ``indices`` names only the real rows, which come first."""
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size {batch_size!r} must be None or a positive integer")
  order = np.argsort([len(r) for r in rows], kind="stable")
  size = len(rows) if batch_size is None else int(batch_size)
  filler = np.full((1,), PAD_ID, np.int32)
  for start in range(0, len(rows), size):
    idx = order[start:start + size]
    batch = [rows[i] for i in idx]
    if len(rows) > size:
      batch += [filler] * (size - len(idx))
    tokens, lengths = pad_rows(batch, bucket)
    yield idx, tokens, lengths[:len(idx)]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, tokens, lengths, *, max_len):
  return prefill(nnx.merge(graphdef, state), tokens, lengths, max_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy", "return_logits",
                                             "kv"), donate_argnames=("cache",))
def _decode_loop(graphdef, state, logits, cache, stop, key, temperature, top_k, top_p, *,
                 max_new, greedy, return_logits, kv=None):
  """Sample from the prefill's logits, then decode until max_new tokens or every row stopped.
  ``kv``: the cache is sharded as it says (generation on a context mesh). Returns (tokens,
  logits, the final cache). The cache (the prefill's, nobody else's) is donated and returned,
  so the loop updates it in place instead of first copying it (a second KV cache in memory:
  11 GB for evo2-7b at batch 16 after 8K tokens)."""
  model = nnx.merge(graphdef, state)
  if kv is None:
    step = functools.partial(decode_step, model)
  else:
    def step(cache, tok):
      logits, cache = forward_segment(model, cache, tok[:, None], kv)
      return logits[:, 0], cache
  pick = functools.partial(sample, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
                           greedy=greedy)
  batch, vocab = logits.shape
  tok = pick(logits, step=0)
  out = jnp.full((batch, max_new), PAD_ID, jnp.int32).at[:, 0].set(tok)
  seen = (jnp.zeros((batch, max_new, vocab), jnp.float32).at[:, 0].set(logits)
          if return_logits else jnp.zeros((), jnp.float32))
  done = jnp.isin(tok, stop)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, cache, tok, done, out, seen = carry
    logits, cache = step(cache, tok)
    nxt = jnp.where(done, PAD_ID, pick(logits, step=i))
    out = out.at[:, i].set(nxt)
    if return_logits:
      seen = seen.at[:, i].set(logits)
    return i + 1, cache, nxt, done | jnp.isin(nxt, stop), out, seen

  carry = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, done, out, seen))
  return carry[4], carry[5], carry[1]  # the cache too: returned, its donated buffers are reused


def _prefill_rows(graphdef, state, rows, max_new: int, prefill_rows):
  tokens, lengths = pad_rows(rows, PROMPT_BUCKET)
  max_len = tokens.shape[1] + max_new
  max_len += max_len % 2  # an even KV cache: decoding's attention can be cuDNN without a copy
  rows_per = len(rows) if prefill_rows is None else prefill_rows
  if not isinstance(rows_per, (int, np.integer)) or rows_per < 1:
    raise ValueError(f"prefill_rows {prefill_rows!r} must be None or a positive integer")
  parts = [_prefill(graphdef, state, jnp.asarray(tokens[i:i + rows_per]),
                    jnp.asarray(lengths[i:i + rows_per]), max_len=max_len)
           for i in range(0, len(rows), rows_per)]
  return (parts[0] if len(parts) == 1 else
          jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts))


def _prefill_on_mesh(model, rows, max_new: int, mesh, segment_len):
  lengths = sorted({len(r) for r in rows})
  if len(lengths) > 1:
    raise ValueError(f"with a mesh, prompts must have equal lengths; got lengths {lengths}")
  tokens = np.stack(rows)
  seg = tokens.shape[1] if segment_len is None else segment_len
  outs, cache = segmented_apply(model, tokens, seg, head=last_logits_head,
                                max_len=tokens.shape[1] + max_new, mesh=mesh)
  return jnp.asarray(outs[-1]), cache, sharded_kv(mesh, seg)


def generate(model, prompt_tokens, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = (), return_logits: bool = False,
             prefill_rows: int | None = None, mesh=None, segment_len: int | None = None):
  """Sample ``max_new_tokens`` after each prompt.

  prompt_tokens: 1-D ids (one prompt), [B, L] ids, or a list of 1-D id sequences of any
  lengths. temperature 0 is greedy; top_k / top_p restrict the draw; ``seed`` fixes it.
  After a row emits one of ``stop_tokens`` (kept in the output) the rest of it is PAD_ID.
  Returns int32 ids [max_new_tokens] for one prompt, else [B, max_new_tokens]; with
  ``return_logits`` also the float32 logits that chose each token ([.., max_new_tokens, V];
  zeros after every row stopped). ``prefill_rows`` prefills that many rows per call (rows are
  independent): long prompts on big models need it (an 8K-token evo2-7b row takes ~8 GiB).
  ``mesh``: prefill in segments of ``segment_len`` (default: the whole prompt) and keep the KV
  cache sharded over the mesh's ``context`` axis; the prompts must then have equal lengths.
  """
  cfg = model.cfg
  rows, single = as_token_rows(prompt_tokens, cfg.vocab_size)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens {max_new_tokens!r} must be a positive integer")
  check_sampling(temperature, top_k, top_p, cfg.vocab_size)
  stop = np.asarray(list(stop_tokens), np.int32).reshape(-1)
  if stop.size and (stop.min() < 0 or stop.max() >= cfg.vocab_size):
    raise ValueError(f"stop_tokens {list(stop_tokens)} must be ids in 0..{cfg.vocab_size - 1}")
  # Padded with -1 (never a token) to a multiple of 8: fewer shapes, fewer recompilations.
  stop = np.pad(stop, (0, max(8, -(-stop.size // 8) * 8) - stop.size), constant_values=-1)
  # Matrices in the compute dtype once, not cast from float32 inside the loop every token
  # (identical outputs; the loop then streams 2-byte weights).
  graphdef, state = nnx.split(model.with_compute_dtype_weights())
  kv = None
  if mesh is None:
    logits, cache = _prefill_rows(graphdef, state, rows, int(max_new_tokens), prefill_rows)
  else:
    logits, cache, kv = _prefill_on_mesh(model, rows, int(max_new_tokens), mesh, segment_len)
    state = jax.device_put(state, NamedSharding(mesh, P()))
  out, logits, _ = _decode_loop(
      graphdef, state, logits, cache, jnp.asarray(stop), jax.random.key(seed),
      jnp.float32(temperature if temperature > 0 else 1.0), jnp.int32(top_k or 0),
      jnp.float32(top_p if top_p is not None else 1.0), max_new=int(max_new_tokens),
      greedy=temperature == 0, return_logits=return_logits, kv=kv)
  out = np.asarray(out)
  logits = np.asarray(logits) if return_logits else None
  if single:
    out = out[0]
    logits = logits[0] if return_logits else None
  return (out, logits) if return_logits else out
