"""Context parallelism for LI by state passing: no all-to-all of activations.

The LI filter is a diagonal linear recurrence with N float32 states per channel, so a sequence
shard needs from the rest of the sequence only the [B, D, N] state at its start. With the
zig-zag layout (``zigzag.py``) rank r holds global chunks r and 2R-1-r (R ranks, c tokens each):

1. Each rank runs the LI core on its two chunks as a batch of two, from a zero state
   (``modal_scan`` with its final state out, or the FFT reference + ``conv.modal_state``):
   local outputs y_loc [B, 2c, D] and the end states e [B, 2, D, N].
2. The end states are all-gathered ([R, B, 2, D, N] float32: 2 R B D N floats, tiny next to an
   activation shard) and every rank runs the same exclusive scan over the 2R chunks in global
   order: s_in[k] = a^c s_in[k-1] + e[k-1], s_in[0] = 0.
3. Each rank adds its correction, the response of its chunks' incoming states
   ``x2 * sum_n R_n a_n^(t+1) s_in[n]`` (``modal_scan.state_response``, chunked, exponents >= 0).

Gradients flow through all three steps (the kernel's custom VJP takes the final-state
cotangent). Compared with the all-to-all path (``a2a.py``: two all-to-alls of [B, L/R, D]
activations per layer and direction), state passing moves 2 R B D N floats per layer and keeps
every channel on its rank. ``li_mode`` names for the context-parallel forward: ``state``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import modal_scan as ms
from sh2_jax.parallel.zigzag import merge_chunks, split_chunks


def local_modal(x1, v, x2, log_poles, residues, dskip, impl: str, interpret: bool = False):
  """The LI core of independent sequences [B', c, D] from zero states: (y, final state)."""
  if impl == "modal_scan":
    return ms.modal_scan(x1, v, x2, log_poles, residues, dskip, interpret=interpret)
  if impl == "fft":
    return ms.modal_scan_reference(x1, v, x2, log_poles, residues, dskip)
  raise ValueError(f"state passing li_impl {impl!r} is not one of modal_scan, fft")


def incoming_states(ends: jax.Array, log_poles: jax.Array, chunk: int, axis_name: str,
                    n: int) -> jax.Array:
  """This rank's end states [B, 2, D, N] (slots: chunk r, chunk 2R-1-r) -> the incoming states
  of the same two chunks, [B, 2, D, N], after an all-gather and an exclusive scan over the 2R
  chunks in global order."""
  every = jax.lax.all_gather(ends, axis_name)                    # [R, B, 2, D, N]
  ordered = jnp.concatenate([every[:, :, 0], every[::-1, :, 1]], axis=0)  # [2R, B, D, N]
  decay = jnp.exp(log_poles.astype(jnp.float32) * float(chunk))

  def body(s, e):
    return decay * s + e, s

  _, s_in = jax.lax.scan(body, jnp.zeros_like(ordered[0]), ordered)  # exclusive
  r = jax.lax.axis_index(axis_name)
  mine = jnp.stack([s_in[r], s_in[2 * n - 1 - r]], axis=1)      # [B, 2, D, N]
  return mine


def state_passing_gated_modal(x1, v, x2, log_poles, residues, dskip, axis_name: str, n: int,
                              impl: str = "modal_scan", interpret: bool = False):
  """Inside shard_map: the gated LI core ``x2 * (h_modal * (x1 * v) + dskip * x1 * v)`` of this
  rank's zig-zag shard (x1, v, x2: [B, 2c, D]; log_poles, residues: [D, N], replicated) ->
  [B, 2c, D] in x1's dtype, equal to the unsharded result at those positions."""
  b, l2, d = x1.shape
  c = l2 // 2
  fold = lambda a: split_chunks(a).reshape(2 * b, c, d)         # two chunks as a batch of two
  y_loc, ends = local_modal(fold(x1), fold(v), fold(x2), log_poles, residues, dskip, impl,
                            interpret)
  s_in = incoming_states(ends.reshape(b, 2, d, -1), log_poles, c, axis_name, n)
  corr = ms.state_response(s_in.reshape(2 * b, d, -1), log_poles, residues, c)
  y = y_loc.astype(jnp.float32) + fold(x2).astype(jnp.float32) * corr
  return merge_chunks(y.astype(x1.dtype).reshape(b, 2, c, d))


def self_check(interpret: bool = True, devices: int = 8, seed: int = 0) -> int:
  """Compare state passing on a ``devices``-rank context mesh with the unsharded kernel
  (forward and the gradients of all inputs) and with the all-to-all path (forward). Prints the
  relative errors; returns 0 when all are <= 1e-5 (a process exit code)."""
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P

  from sh2_jax.parallel import a2a
  from sh2_jax.parallel.zigzag import zigzag_shard, zigzag_unshard

  if len(jax.devices()) < devices:
    print(f"need {devices} devices, have {len(jax.devices())}")
    return 2
  mesh = Mesh(np.array(jax.devices()[:devices]), ("context",))
  rng = np.random.default_rng(seed)
  b, d, states, c = 2, 16, 16, 11
  length = 2 * devices * c
  x1, v, x2, dy = (jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
                   for _ in range(4))
  lam = jnp.asarray(-np.exp(rng.uniform(np.log(1e-5), np.log(8.0), (d, states))), jnp.float32)
  res = jnp.asarray(rng.standard_normal((d, states)) * 0.1, jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(d), jnp.float32)
  spec = P(None, "context", None)
  impl = "modal_scan"

  def sharded(fn):
    def run(x1, v, x2, lam, res, dskip):
      zz = lambda a: zigzag_shard(a, devices)
      y = jax.shard_map(lambda a, bb, cc, l_, r_, s_: fn(a, bb, cc, l_, r_, s_),
                        mesh=mesh, in_specs=(spec, spec, spec, P(), P(), P()), out_specs=spec,
                        check_vma=False)(zz(x1), zz(v), zz(x2), lam, res, dskip)
      return zigzag_unshard(y, devices)
    return run

  sp = sharded(lambda *a: state_passing_gated_modal(*a, "context", devices, impl, interpret))
  full = lambda *a: ms.gated_modal_scan(*a, interpret=interpret)
  via_a2a = sharded(lambda *a: a2a.a2a_gated_modal(*a, "fft", "context", devices))
  args = (x1, v, x2, lam, res, dskip)

  def rel(a, bb):
    a, bb = np.asarray(a, np.float64), np.asarray(bb, np.float64)
    return float(np.linalg.norm(a - bb) / np.linalg.norm(bb)) if np.isfinite(a).all() else 1.0

  y_sp, y_full, y_a2a = sp(*args), full(*args), via_a2a(*args)
  errs = {"forward": rel(y_sp, y_full), "a2a_forward": rel(y_a2a, y_full)}
  loss = lambda f: (lambda *a: jnp.sum(f(*a) * dy))
  g_sp = jax.grad(loss(sp), argnums=range(6))(*args)
  g_full = jax.grad(loss(full), argnums=range(6))(*args)
  for name, a, bb in zip(("dx1", "dv", "dx2", "dlog_poles", "dresidues", "ddskip"), g_sp,
                         g_full):
    errs[name] = rel(a, bb)
  print(" ".join(f"{k}={e:.1e}" for k, e in errs.items()))
  return 0 if all(e <= 1e-5 for e in errs.values()) else 1
