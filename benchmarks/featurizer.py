"""The Hyena featurizer and its split at the 7B shape: what the checkpoint's interleaved channels
cost against the same channels blocked.

The projection z = x W [B, L, 3D] holds (x2, x1, v) interleaved, at columns 0::3, 1::3, 2::3
(the Evo 2 checkpoint's layout); ``ops.fir.featurize`` convolves z with its 3-tap filter and
splits it with stride-3 column slices (its backward interleaves the three gradients again). A
projection whose columns were permuted at use (W[:, perm], the filter rows likewise) would give
[x2 | x1 | v] blocked, split by contiguous slices. Both compute the same numbers (checked first:
equal after the permutation, forward and gradients). Timed per layer, forward and
forward+backward (``jax.vjp`` with a fixed cotangent), against the copy-rate floor of the bytes
each must move (forward: read z, write x2, x1, v; backward: read the three cotangents and z, write
dz), beside the cost of permuting the projection weight at use (float32 [D, 3D] -> bf16, and
its gradient back). Asks: what would the 128K train step gain from the blocked layout (RESULTS,
"128K: ... what bounds the training ratio": ``loop_slice_fusion_1``, 12 per step x 6.0 ms)?

``--mode variants`` times candidate formulations of the same math as the model calls them
(float32 master taps flipped inside the jit; bf16 taps for the inference forward), each checked
against ``fir.featurize`` first: the taps as contiguous [K, C] rows behind an optimisation
barrier (the 128K train step's featurizer fusion reads them as stride-3 columns of [C, K]), the
backward by parts (per output, no stacked float32 cotangent), and both. Standalone times do not
predict the fusion inside a train step (RESULTS, "What the featurizer costs the 128K train
step"): ``benchmarks/train_step.py --featurizer NAME`` (``SHORT`` below) runs a candidate there.

  python benchmarks/featurizer.py [--lengths 32768,131072] [--width 4096] [--out DIR]
  python benchmarks/featurizer.py --mode variants [--lengths 131072,32768] [--out DIR]
  python benchmarks/featurizer.py --smoke [--mode variants]    # CPU plumbing check
"""

from __future__ import annotations

import argparse
import functools
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
def featurize_blocked(z, w):
  """``featurize`` for blocked channels: z [B, L, 3D] = [x2 | x1 | v] -> (x2, x1, v)."""
  d = z.shape[-1] // 3
  zc = fir.featurizer_conv(z, w)
  return zc[..., :d], zc[..., d:2 * d], zc[..., 2 * d:]


def _blocked_fwd(z, w):
  return featurize_blocked(z, w), (z, w)


def _blocked_bwd(res, g):
  z, w = res
  return fir.featurizer_conv_grads(z, w, jnp.concatenate([gi.astype(jnp.float32) for gi in g],
                                                         axis=-1))


featurize_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def permuted_weight(w, perm):
  """The projection weight at use: float32 master [D, 3D] -> its columns permuted, in bf16."""
  return w[:, perm].astype(jnp.bfloat16)


def check(d: int, length: int) -> dict:
  """Both layouts on the same random inputs (float32, small): the largest differences."""
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, length, 3 * d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3 * d, 3)), jnp.float32)
  perm = blocked_perm(d)
  g = tuple(jnp.asarray(rng.standard_normal((2, length, d)), jnp.float32) for _ in range(3))
  y_i, vjp_i = jax.vjp(fir.featurize, z, w)
  y_b, vjp_b = jax.vjp(featurize_blocked, z[..., perm], w[perm])
  dz_i, dw_i = vjp_i(g)
  dz_b, dw_b = vjp_b(g)
  return dict(y=max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(y_i, y_b)),
              dz=float(jnp.max(jnp.abs(dz_i[..., perm] - dz_b))),
              dw=float(jnp.max(jnp.abs(dw_i[perm] - dw_b))))


# ---- candidate formulations of ``fir.featurize`` (the math is ``fir.shifted_sum`` and
# ``fir.shifted_sum_grads`` throughout; the candidates differ in how the taps are laid out and
# how the backward is cut)
F32 = jnp.float32


def tap_rows(w, barrier: bool = True):
  """w [C, K] -> [K, C] float32 (one contiguous row per tap), behind a barrier by default."""
  wt = w.astype(F32).T
  return jax.lax.optimization_barrier(wt) if barrier else wt


tap_vectors = fir.tap_vectors  # what fir.featurize uses under differentiation since 2026-12-03


whole_fwd = fir.featurize_taps  # convolve all 3D channels, then split (as ``fir.featurize``)


def parts_fwd(z, taps):
  """Split first, then convolve each part with its own taps (no [B, L, 3D] result)."""
  return tuple(fir.shifted_sum(z[..., j::3].astype(F32), taps[:, j::3]).astype(z.dtype)
               for j in range(3))


def model_bwd(z, w, taps, g):
  """``fir.featurize``'s own backward (the taps as stride-K columns of w)."""
  del taps
  return fir.featurizer_conv_grads(z, w, fir.interleave(g))


whole_bwd = fir.featurize_taps_grads  # the model's backward with the candidate's taps


def parts_bwd(z, w, taps, g):
  """Per part: no stacked float32 cotangent [B, L, 3D]; dz interleaved once at the end."""
  b, length, c3 = z.shape
  grads = [fir.shifted_sum_grads(z[..., j::3], taps[:, j::3], g[j].astype(F32))
           for j in range(3)]
  dz = fir.interleave([dz for dz, _ in grads]).astype(z.dtype)
  dw = jnp.stack([dw for _, dw in grads], axis=1).reshape(c3, -1)  # [D, 3, K] -> [3D, K]
  return dz, dw.astype(w.dtype)


def candidate(fwd, bwd, taps):
  """A custom-VJP featurizer ``f(z, w) -> (x2, x1, v)``: ``taps(w)`` lays out the filter,
  ``fwd(z, taps)`` and ``bwd(z, w, taps, g) -> (dz, dw)`` compute."""
  @jax.custom_vjp
  def f(z, w):
    return fwd(z, taps(w))

  def f_fwd(z, w):
    t = taps(w)
    return fwd(z, t), (z, w, t)

  def f_bwd(res, g):
    z, w, t = res
    return bwd(z, w, t, g)

  f.defvjp(f_fwd, f_bwd)
  return f


VARIANTS = {"v0 (fir.featurize)": fir.featurize,
            "v0 + tap rows (fwd)": candidate(whole_fwd, model_bwd, tap_rows),
            "tap rows (fwd + bwd)": candidate(whole_fwd, whole_bwd, tap_rows),
            "tap rows + parts bwd": candidate(whole_fwd, parts_bwd, tap_rows),
            "parts": candidate(parts_fwd, parts_bwd, functools.partial(tap_rows, barrier=False)),
            "parts + barrier": candidate(parts_fwd, parts_bwd, tap_rows),
            "tap vectors (fwd + bwd)": candidate(whole_fwd, whole_bwd, tap_vectors)}
# Short names, for ``benchmarks/train_step.py --featurizer`` (the candidate inside the step).
SHORT = dict(zip(("v0", "v0_rows_fwd", "rows", "rows_parts", "parts", "parts_barrier",
                 "vectors"), VARIANTS))


def bench_inputs(length: int, d: int, w_dtype):
  """Random z [1, L, 3D] bf16, taps [3D, 3], cotangents (x2, x1, v), and the copy-rate floors'
  bytes: forward 2 passes of z, forward + backward 5."""
  z = jax.random.normal(jax.random.key(length), (1, length, 3 * d), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3 * d, 3), w_dtype)
  g = tuple(jax.random.normal(jax.random.key(2 + i), (1, length, d), jnp.bfloat16)
            for i in range(3))
  nbytes = z.size * z.dtype.itemsize  # one [B, L, 3D] bf16 pass
  return z, w, g, {"fwd": 2 * nbytes, "fwd+bwd": (2 + 3) * nbytes}


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
    z, w, g, floor_bytes = bench_inputs(length, d, jnp.bfloat16)
    floors = {k: v / copy for k, v in floor_bytes.items()}
    for name, fn, zz, ww in (("interleaved (fir.featurize)", fir.featurize, z, w),
                             ("blocked", featurize_blocked, z[..., perm], w[perm])):
      fwd = jax.jit(fn)
      both = jax.jit(lambda zz, ww, fn=fn: jax.vjp(fn, zz, ww)[1](g))
      t_f = common.timeit(fwd, zz, ww)
      t_b = common.timeit(both, zz, ww)
      rows.append(rec.add(kind="featurizer", layout=name, L=length, width=d, fwd_s=t_f,
                          fwd_bwd_s=t_b, pct_floor_fwd=100 * floors["fwd"] / t_f,
                          pct_floor_fwd_bwd=100 * floors["fwd+bwd"] / t_b))
    wm = jax.random.normal(jax.random.key(9), (d, 3 * d), jnp.float32)
    at_use = jax.jit(functools.partial(permuted_weight, perm=perm))
    grad_back = jax.jit(jax.grad(lambda wm: jnp.sum(permuted_weight(wm, perm)
                                                    .astype(jnp.float32))))
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


def check_variants(d: int, length: int) -> dict:
  """Each variant against ``fir.featurize`` (float32, small, B = 2): the largest differences."""
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((2, length, 3 * d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3 * d, 3)), jnp.float32)
  g = tuple(jnp.asarray(rng.standard_normal((2, length, d)), jnp.float32) for _ in range(3))
  y0, vjp0 = jax.vjp(fir.featurize, z, w)
  dz0, dw0 = vjp0(g)
  errs = {}
  for name, fn in VARIANTS.items():
    y, vjp = jax.vjp(fn, z, w)
    dz, dw = vjp(g)
    errs[name] = max([float(jnp.max(jnp.abs(a - b))) for a, b in zip(y, y0)]
                     + [float(jnp.max(jnp.abs(dz - dz0))), float(jnp.max(jnp.abs(dw - dw0)))])
  return errs


def run_variants(a) -> list[dict]:
  """Each candidate as the model calls it: float32 master taps [3D, 3] flipped inside the jit
  (training), and bf16 taps (inference forward)."""
  info = common.device_info()
  print(info, flush=True)
  errs = check_variants(8 if a.smoke else 64, 37)
  print("check against fir.featurize (float32, L 37, B 2): max |diff| "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
  if max(errs.values()) > 1e-4:
    raise SystemExit(f"a variant does not reproduce fir.featurize: {errs}")
  copy = common.copy_bandwidth(1 << 24 if a.smoke else 1 << 30)
  rec = common.Recorder(a.out, "featurizer_variants")
  rec.add(kind="ceiling", copy_Bps=copy, check=errs, **info)
  d = a.width
  rows = []
  for length in a.lengths:
    z, w32, g, floor_bytes = bench_inputs(length, d, jnp.float32)
    floors = {k: v / copy for k, v in floor_bytes.items()}
    for name, fn in VARIANTS.items():
      fwd32 = jax.jit(lambda zz, ww, fn=fn: fn(zz, jnp.flip(ww, axis=1)))
      fwd16 = jax.jit(lambda zz, ww, fn=fn: fn(zz, jnp.flip(ww, axis=1).astype(jnp.bfloat16)))
      both = jax.jit(lambda zz, ww, fn=fn: jax.vjp(lambda a, b: fn(a, jnp.flip(b, axis=1)),
                                                   zz, ww)[1](g))
      t_f, t_16, t_b = (common.timeit(f, z, w32) for f in (fwd32, fwd16, both))
      rows.append(rec.add(kind="featurizer_variant", variant=name, L=length, width=d,
                          fwd_s=t_f, fwd_bf16_taps_s=t_16, fwd_bwd_s=t_b,
                          pct_floor_fwd=100 * floors["fwd"] / t_f,
                          pct_floor_fwd_bwd=100 * floors["fwd+bwd"] / t_b))
      print(f"L={length} {name}: fwd {t_f * 1e3:.3f} ms (bf16 taps {t_16 * 1e3:.3f}), "
            f"fwd+bwd {t_b * 1e3:.3f} ms", flush=True)
  table = [[f"{r['L'] // 1024}K" if r["L"] >= 1024 else r["L"], r["variant"],
            common.fmt_ms(r["fwd_s"]), common.fmt_ms(r["fwd_bf16_taps_s"]),
            common.fmt_ms(r["fwd_bwd_s"]), f"{r['pct_floor_fwd']:.0f}%",
            f"{r['pct_floor_fwd_bwd']:.0f}%"] for r in rows]
  print(f"\nCard: {info['device']}; {info['date']}; JAX {info['jax']}; copy "
        f"{copy / 1e12:.2f} TB/s (measured, the floor's rate). Width {d}, B = 1, bf16 z.\n")
  print(common.markdown_table(["L", "variant", "fwd ms (f32 taps)", "fwd ms (bf16 taps)",
                               "fwd+bwd ms", "fwd % of floor", "fwd+bwd % of floor"], table),
        flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="32768,131072", help="comma list of sequence lengths")
  p.add_argument("--width", type=int, default=4096, help="D (z has 3D channels)")
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (plumbing check)")
  p.add_argument("--mode", default="layouts", choices=["layouts", "variants"],
                 help="layouts: interleaved against blocked; variants: the implementations")
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
  (run_variants if a.mode == "variants" else run)(a)


if __name__ == "__main__":
  main()
