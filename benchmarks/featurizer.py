"""The Hyena featurizer and its split at the 7B shape: the checkpoint's interleaved channels
against the blocked order the model uses.

The projection z = x W [B, L, 3D] holds (x2, x1, v) interleaved in the checkpoint, at columns
0::3, 1::3, 2::3. The model permutes W's columns (and the featurizer's rows) at use
(``ops.fir.to_blocked``), so z is [x2 | x1 | v] blocked and ``ops.fir.featurize`` splits it by
contiguous slices; the interleaved form (stride-3 slices, its backward interleaving the three
gradients again) is kept here as the baseline. Variants: the interleaved baseline,
``fir.featurize`` (blocked; backward: the three float32 cotangents concatenated, one pass), and a
blocked backward run per part (dz and dw of each third, then concatenated). All compute the same
numbers (checked first: equal after the permutation, forward and gradients). Timed per layer,
forward and forward+backward (``jax.vjp`` with a fixed cotangent), against the copy-rate floor of
the bytes each must move (forward: read z, write x2, x1, v; backward: read the three cotangents
and z, write dz), beside the cost of permuting the projection weight at use (float32 [D, 3D] ->
bf16, and its gradient back).

  python benchmarks/featurizer.py [--lengths 32768,131072] [--width 4096] [--out DIR]
  python benchmarks/featurizer.py --smoke     # CPU plumbing check
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from sh2_jax.ops import fir  # noqa: E402


def blocked_perm(d: int) -> np.ndarray:
  """Column order that turns the interleaved [.., 3D] layout into [x2 | x1 | v]."""
  return np.concatenate([np.arange(j, 3 * d, 3) for j in range(3)])


@jax.custom_vjp
def featurize_interleaved(z, w):
  """The checkpoint's order: z [B, L, 3D] interleaved -> (x2, x1, v) by stride-3 slices."""
  zc = fir.featurizer_conv(z, w)
  return zc[..., 0::3], zc[..., 1::3], zc[..., 2::3]


def _interleaved_fwd(z, w):
  return featurize_interleaved(z, w), (z, w)


def _interleaved_bwd(res, g):
  z, w = res
  b, length, c3 = z.shape
  gy = jnp.stack([gi.astype(jnp.float32) for gi in g], axis=-1).reshape(b, length, c3)
  return fir.featurizer_conv_grads(z, w, gy)


featurize_interleaved.defvjp(_interleaved_fwd, _interleaved_bwd)


@jax.custom_vjp
def featurize_per_part(z, w):
  """``fir.featurize`` with its backward run per third (dz, dw of each, then concatenated)."""
  return fir.featurize(z, w)


def _per_part_fwd(z, w):
  return featurize_per_part(z, w), (z, w)


def _per_part_bwd(res, g):
  z, w = res
  d = z.shape[-1] // 3
  parts = [fir.featurizer_conv_grads(z[..., p * d:(p + 1) * d], w[p * d:(p + 1) * d],
                                     g[p].astype(jnp.float32)) for p in range(3)]
  return (jnp.concatenate([dz for dz, _ in parts], axis=-1),
          jnp.concatenate([dw for _, dw in parts], axis=0))


featurize_per_part.defvjp(_per_part_fwd, _per_part_bwd)

VARIANTS = (("interleaved (checkpoint order)", featurize_interleaved, False),
            ("blocked (fir.featurize)", fir.featurize, True),
            ("blocked, backward per part", featurize_per_part, True))


def permuted_weight(w):
  """The projection weight at use: float32 master [D, 3D] -> blocked columns, in bf16."""
  return fir.to_blocked(w).astype(jnp.bfloat16)


def check(d: int, length: int) -> dict:
  """Every variant on the same random inputs (float32, small) against the interleaved baseline
  after the permutation: the largest differences."""
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, length, 3 * d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3 * d, 3)), jnp.float32)
  perm = blocked_perm(d)
  g = tuple(jnp.asarray(rng.standard_normal((2, length, d)), jnp.float32) for _ in range(3))
  y_i, vjp_i = jax.vjp(featurize_interleaved, z, w)
  dz_i, dw_i = vjp_i(g)
  err = dict(y=0.0, dz=0.0, dw=0.0)
  for _, fn, _ in VARIANTS[1:]:
    y_b, vjp_b = jax.vjp(fn, z[..., perm], w[perm])
    dz_b, dw_b = vjp_b(g)
    err["y"] = max(err["y"], *(float(jnp.max(jnp.abs(a - b))) for a, b in zip(y_i, y_b)))
    err["dz"] = max(err["dz"], float(jnp.max(jnp.abs(dz_i[..., perm] - dz_b))))
    err["dw"] = max(err["dw"], float(jnp.max(jnp.abs(dw_i[perm] - dw_b))))
  return err


def run(a) -> list[dict]:
  info = common.device_info()
  print(info, flush=True)
  err = check(8 if a.smoke else 64, 37)
  print(f"check (float32, D {8 if a.smoke else 64}, L 37, B 2): max |diff| y {err['y']:.1e}, "
        f"dz {err['dz']:.1e}, dw {err['dw']:.1e}", flush=True)
  if max(err.values()) > 1e-5:
    raise SystemExit(f"the blocked layout does not reproduce the interleaved one: {err}")
  copy = common.copy_bandwidth(1 << 24 if a.smoke else 1 << 30)
  rec = common.Recorder(a.out, "featurizer")
  rec.add(kind="ceiling", copy_Bps=copy, check=err, **info)
  d = a.width
  perm = jnp.asarray(blocked_perm(d))
  rows = []
  for length in a.lengths:
    key = jax.random.key(length)
    z = jax.random.normal(key, (1, length, 3 * d), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3 * d, 3), jnp.bfloat16)
    g = tuple(jax.random.normal(jax.random.key(2 + i), (1, length, d), jnp.bfloat16)
              for i in range(3))
    nbytes = z.size * z.dtype.itemsize  # one [B, L, 3D] bf16 pass
    floors = {"fwd": 2 * nbytes / copy, "fwd+bwd": (2 + 3) * nbytes / copy}
    for name, fn, blocked in VARIANTS:
      zz, ww = (z[..., perm], w[perm]) if blocked else (z, w)
      fwd = jax.jit(fn)
      both = jax.jit(lambda zz, ww, fn=fn: jax.vjp(fn, zz, ww)[1](g))
      t_f = common.timeit(fwd, zz, ww)
      t_b = common.timeit(both, zz, ww)
      rows.append(rec.add(kind="featurizer", layout=name, L=length, width=d, fwd_s=t_f,
                          fwd_bwd_s=t_b, pct_floor_fwd=100 * floors["fwd"] / t_f,
                          pct_floor_fwd_bwd=100 * floors["fwd+bwd"] / t_b))
    wm = jax.random.normal(jax.random.key(9), (d, 3 * d), jnp.float32)
    at_use = jax.jit(permuted_weight)
    grad_back = jax.jit(jax.grad(lambda wm: jnp.sum(permuted_weight(wm).astype(jnp.float32))))
    t_w, t_wb = common.timeit(at_use, wm), common.timeit(grad_back, wm)
    rows.append(rec.add(kind="featurizer", layout="weight permuted at use (D x 3D)", L=length,
                        width=d, fwd_s=t_w, fwd_bwd_s=t_w + t_wb, pct_floor_fwd=None,
                        pct_floor_fwd_bwd=None))
  table = [[f"{r['L'] // 1024}K" if r["L"] >= 1024 else r["L"], r["layout"],
            common.fmt_ms(r["fwd_s"]), common.fmt_ms(r["fwd_bwd_s"]),
            "–" if r["pct_floor_fwd"] is None else f"{r['pct_floor_fwd']:.0f}%",
            "–" if r["pct_floor_fwd_bwd"] is None else f"{r['pct_floor_fwd_bwd']:.0f}%"]
           for r in rows]
  print(f"\nCard: {info['device']}; {info['date']}; JAX {info['jax']}; copy "
        f"{copy / 1e12:.2f} TB/s (measured, the floor's rate). Width {d}, B = 1, bf16.\n")
  print(common.markdown_table(["L", "layout", "fwd ms", "fwd+bwd ms", "fwd % of floor",
                               "fwd+bwd % of floor"], table), flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="32768,131072", help="comma list of sequence lengths")
  p.add_argument("--width", type=int, default=4096, help="D (z has 3D channels)")
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (plumbing check)")
  a = p.parse_args(argv)
  try:
    a.lengths = [int(x) for x in a.lengths.split(",")]
  except ValueError:
    p.error(f"--lengths {a.lengths!r}: expected comma-separated positive integers")
  if any(n <= 0 for n in a.lengths) or a.width <= 0:
    p.error(f"--lengths {a.lengths} and --width {a.width} must be positive")
  if a.smoke:
    jax.config.update("jax_platforms", "cpu")
    a.lengths, a.width = [300], 64
  run(a)


if __name__ == "__main__":
  main()
