"""Context parallelism for LI by state passing: no all-to-all of activations.

The LI filter is a diagonal linear recurrence with N float32 states per channel, so a sequence
shard needs from the rest of the sequence only the [B, D, N] state at its start. With the
zig-zag layout (``zigzag.py``) rank r holds global chunks r and 2R-1-r (R ranks, c tokens each):

1. Each rank runs the LI core on its two chunks as a batch of two, from a zero state (the
   configured core with its final state out, ``dispatch.modal_with_state_fn``):
   local outputs y_loc [B, 2c, D] and the end states e [B, 2, D, N].
2. The end states are all-gathered ([R, B, 2, D, N] float32: 2 R B D N floats, tiny next to an
   activation shard) and every rank runs the same exclusive scan over the 2R chunks in global
   order: s_in[k] = a^c s_in[k-1] + e[k-1], s_in[0] = 0 (``ops.modal.segment_states``).
3. Each rank adds its correction, the response of its chunks' incoming states
   ``x2 * sum_n R_n a_n^(t+1) s_in[n]`` (``ops.modal.state_response``).

Gradients flow through all three steps (the kernel's custom VJP takes the final-state
cotangent). Compared with the all-to-all path (``a2a.py``: two all-to-alls of [B, L/R, D]
activations per layer and direction), state passing moves 2 R B D N floats per layer and keeps
every channel on its rank. ``li_mode`` names for the context-parallel forward: ``state``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sh2_jax.ops import modal
from sh2_jax.parallel.zigzag import merge_chunks, split_chunks


def incoming_states(ends: jax.Array, log_poles: jax.Array, chunk: int, axis_name: str,
                    n: int) -> jax.Array:
  """This rank's end states [B, 2, D, N] (slots: chunk r, chunk 2R-1-r) -> the incoming states
  of the same two chunks, [B, 2, D, N], after an all-gather and an exclusive scan over the 2R
  chunks in global order."""
  every = jax.lax.all_gather(ends, axis_name)                    # [R, B, 2, D, N]
  ordered = jnp.concatenate([every[:, :, 0], every[::-1, :, 1]], axis=0)  # [2R, B, D, N]
  s_in = modal.segment_states(ordered, log_poles, float(chunk))
  r = jax.lax.axis_index(axis_name)
  return jnp.stack([s_in[r], s_in[2 * n - 1 - r]], axis=1)      # [B, 2, D, N]


def state_passing_gated_modal(x1, v, x2, log_poles, residues, dskip, axis_name: str, n: int,
                              local):
  """Inside shard_map: the gated LI core ``x2 * (h_modal * (x1 * v) + dskip * x1 * v)`` of this
  rank's zig-zag shard (x1, v, x2: [B, 2c, D]; log_poles, residues: [D, N], replicated) ->
  [B, 2c, D] in x1's dtype, equal to the unsharded result at those positions. ``local(x1, v,
  x2, log_poles, residues, dskip) -> (y, final state)`` is the LI core from a zero state
  (``dispatch.modal_with_state_fn``)."""
  b, l2, d = x1.shape
  c = l2 // 2
  fold = lambda a: split_chunks(a).reshape(2 * b, c, d)         # two chunks as a batch of two
  y_loc, ends = local(fold(x1), fold(v), fold(x2), log_poles, residues, dskip)
  s_in = incoming_states(ends.reshape(b, 2, d, -1), log_poles, c, axis_name, n)
  corr = modal.state_response(s_in.reshape(2 * b, d, -1), log_poles, residues, c)
  y = y_loc.astype(jnp.float32) + fold(x2).astype(jnp.float32) * corr
  return merge_chunks(y.astype(x1.dtype).reshape(b, 2, c, d))
