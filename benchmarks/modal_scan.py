"""Benchmark of the FFT-free LI core (``sh2_jax/kernels/modal_scan.py``) against the float32 FFT
path and a plain-XLA chunked form of the same recurrence.

Width 4096, batch 1, 16 states, bf16 inputs (float32 states and filter math), gated LI core
``y = x2 * (h_modal * (x1 * v) + dskip * x1 * v)``. Forward and forward+backward (vjp of all of
x1, v, x2, log_poles, residues, dskip) medians; bytes moved against the measured copy bandwidth.

  python benchmarks/modal_scan.py --mode all              # checks, sweeps at 16K, table 16K/64K
  python benchmarks/modal_scan.py --mode sweep            # checks + block-size sweeps at 16K
  python benchmarks/modal_scan.py --mode table --out DIR  # the table with default block sizes
  python benchmarks/modal_scan.py --mode variants         # the fast kernels' variants (below)

``--mode variants`` times the fast token-serial kernels (``sh2_jax/kernels/modal_fast.py``,
``li_impl = modal_fast``) per block-size variant: each is first checked against the FFT path
(forward and all six gradients; the max relative error is printed), then its forward and
forward+backward are timed at 16K, width 4096, B = 1, bf16, against the floor of 4 (forward) and
4 + 7 (forward+backward) [L, D] arrays at the copy rate measured in the same run. A variant that
fails to compile prints its error line and the run goes on; ``--budget`` bounds the wall clock.

Both Pallas forms are measured: the chunked kernels (``modal_scan``, the li_impl default) and the
token-serial kernels (``modal_serial``, ``sh2_jax/kernels/modal_scan_serial.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth, short_error, timeit  # noqa: E402
from sh2_jax.kernels import modal_fast as mf  # noqa: E402
from sh2_jax.kernels import modal_fast_bwd as mfb  # noqa: E402
from sh2_jax.kernels import modal_fast_layout as mfl  # noqa: E402
from sh2_jax.kernels import modal_scan as ms  # noqa: E402
from sh2_jax.kernels import modal_scan_serial as mss  # noqa: E402
from sh2_jax import dispatch  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

D, N = 4096, 16
HI = jax.lax.Precision.HIGHEST


def xla_chunked_modal(x1, v, x2, log_poles, residues, dskip, chunk: int = 64):
  """The plain-XLA chunked form of the gated LI core: per chunk of c tokens a per-channel
  Toeplitz (batched matvec), chunk-end states [B, M, D, N], a scan of the states across chunks
  (associative), and the inter-chunk term from the incoming states. Every exponent >= 0.
  Differentiated by XLA autodiff. L must be a multiple of ``chunk``."""
  b, length, d = x1.shape
  m = length // chunk
  lam = log_poles.astype(jnp.float32)
  res = residues.astype(jnp.float32)
  u = (x1 * v).astype(jnp.float32).reshape(b, m, chunk, d)
  i = jnp.arange(chunk, dtype=jnp.float32)
  lag = i[:, None] - i[None, :]
  toe = jnp.einsum("dn,dnij->dij", res, jnp.exp(lam[..., None, None] * jnp.maximum(lag, 0)),
                   precision=HI) * (lag >= 0)                                    # [D, c, c]
  intra = jnp.einsum("dij,bmjd->bmid", toe, u, precision=HI)
  b_tab = jnp.exp(lam[None] * (chunk - 1 - i)[:, None, None])                    # [c, D, N]
  ends = jnp.einsum("jdn,bmjd->bmdn", b_tab, u, precision=HI)                    # from zero
  a_c = jnp.broadcast_to(jnp.exp(lam * chunk), ends.shape)

  def combine(left, right):
    (a1, s1), (a2, s2) = left, right
    return a1 * a2, a2 * s1 + s2

  _, incl = jax.lax.associative_scan(combine, (a_c, ends), axis=1)
  s_in = jnp.concatenate([jnp.zeros_like(incl[:, :1]), incl[:, :-1]], axis=1)   # exclusive
  a_tab = res[None] * jnp.exp(lam[None] * (i + 1)[:, None, None])                # [c, D, N]
  inter = jnp.einsum("idn,bmdn->bmid", a_tab, s_in, precision=HI)
  z = (intra + inter).reshape(b, length, d) + dskip.astype(jnp.float32) * (x1 * v).astype(
      jnp.float32)
  return (x2.astype(jnp.float32) * z).astype(x1.dtype)


def inputs(length, key=0, dtype=jnp.bfloat16, batch=1, width=D):
  ks = jax.random.split(jax.random.key(key), 7)
  x1, v, x2, dy = (jax.random.normal(k, (batch, length, width), dtype) for k in ks[:4])
  # poles from exp(lambda) = 1 - 1e-5 (slow) to e^-8 (fast), log-uniform rates
  lam = -jnp.exp(jax.random.uniform(ks[4], (width, N), minval=np.log(1e-5), maxval=np.log(8.0)))
  res = jax.random.normal(ks[5], (width, N), jnp.float32) * 0.05
  dskip = jax.random.normal(ks[6], (width,), jnp.float32)
  return x1, v, x2, lam, res, dskip, dy


def serial_core(*args, block_sizes=None, poison=False):
  """The token-serial kernels' y alone (``modal_scan_serial``)."""
  return mss.modal_scan_serial(*args, block_sizes=block_sizes, poison=poison)[0]


def impls(bs_fwd=None, bs_bwd=None, bs_serial=None):
  scan = functools.partial(ms.gated_modal_scan, block_sizes=bs_fwd, bwd_block_sizes=bs_bwd)
  return {
      "modal_scan": scan,
      "modal_serial": functools.partial(serial_core, block_sizes=bs_serial),
      "fft": lambda *a: dispatch.gated_modal(*a, "fft"),
      "xla_chunked": xla_chunked_modal,
  }


def fwd_fn(f):
  return jax.jit(lambda x1, v, x2, lam, res, dsk, dy: f(x1, v, x2, lam, res, dsk))


def fwd_bwd_fn(f):
  def run(x1, v, x2, lam, res, dsk, dy):
    y, pull = jax.vjp(f, x1, v, x2, lam, res, dsk)
    return y, pull(dy)
  return jax.jit(run)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.isfinite(a).all():
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(dtype=jnp.float32, length=3001, width=200, batch=2):
  """Compiled kernels (poisoned outputs) against the FFT path: forward and all six gradients,
  plus the XLA chunked form (L cut to a multiple of its chunk)."""
  args = inputs(length, key=3, dtype=dtype, batch=batch, width=width)
  fs = impls()
  ref = fwd_bwd_fn(fs["fft"])(*args)
  out = fwd_bwd_fn(functools.partial(ms.gated_modal_scan, poison=True))(*args)
  names = ["y", "dx1", "dv", "dx2", "dlam", "dres", "ddskip"]
  errs = dict(zip(names, [rel(out[0], ref[0])] + [rel(a, b) for a, b in zip(out[1], ref[1])]))
  out = fwd_bwd_fn(functools.partial(serial_core, poison=True))(*args)
  errs.update(zip(["serial_" + n for n in names],
                  [rel(out[0], ref[0])] + [rel(a, b) for a, b in zip(out[1], ref[1])]))
  keep = length // 64 * 64
  cut = tuple(a[:, :keep] if a.ndim == 3 else a for a in args)
  refc = fwd_bwd_fn(fs["fft"])(*cut)
  xc = fwd_bwd_fn(fs["xla_chunked"])(*cut)
  errs["xla_chunked_y"] = rel(xc[0], refc[0])
  errs["xla_chunked_dlam"] = rel(xc[1][3], refc[1][3])
  print(f"check {jnp.dtype(dtype).name} B={batch} L={length} D={width}: " +
        " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
  return errs


def bytes_moved(length, itemsize, backward: bool, segmented: bool):
  """Fewest bytes: forward reads x1, v, x2, writes y (+ z when differentiated); backward reads
  x1, v, x2, z, dy and writes dx1, dv, dx2. The segmented launch's first passes read two more."""
  t = length * D * itemsize
  if not backward:
    return t * (4 + (2 if segmented else 0))
  return t * (5 + 8 + (4 if segmented else 0))


def time_point(f, length, backward, dtype=jnp.bfloat16):
  args = inputs(length, dtype=dtype)
  fn = fwd_bwd_fn(f) if backward else fwd_fn(f)
  try:
    return timeit(fn, *args)
  except Exception as err:  # noqa: BLE001 — report and carry on with the other points
    print(f"  failed: {short_error(err)}", flush=True)
    return float("nan")


FWD_SWEEP = [
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=0, num_warps=4),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=64, num_warps=4),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=64, num_warps=2),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=64, num_warps=4, prefetch=False),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=256, num_warps=4),
    ms.BlockSizes(chunk=16, tile=32, segment_chunks=64, num_warps=4),
    ms.BlockSizes(chunk=16, tile=32, segment_chunks=64, num_warps=8),
    ms.BlockSizes(chunk=8, tile=32, segment_chunks=128, num_warps=4),
    ms.BlockSizes(chunk=8, tile=16, segment_chunks=128, num_warps=2),
    ms.BlockSizes(chunk=32, tile=16, segment_chunks=32, num_warps=4),
    ms.BlockSizes(chunk=16, tile=64, segment_chunks=64, num_warps=8),
    ms.BlockSizes(chunk=8, tile=8, segment_chunks=128, num_warps=1),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=16, num_warps=4),
]
BWD_SWEEP = [
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=64, num_warps=8),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=64, num_warps=4),
    ms.BlockSizes(chunk=16, tile=32, segment_chunks=64, num_warps=8),
    ms.BlockSizes(chunk=8, tile=32, segment_chunks=128, num_warps=4),
    ms.BlockSizes(chunk=8, tile=16, segment_chunks=128, num_warps=4),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=0, num_warps=8),
    ms.BlockSizes(chunk=16, tile=16, segment_chunks=32, num_warps=8),
    ms.BlockSizes(chunk=8, tile=8, segment_chunks=128, num_warps=2),
]


SERIAL_SWEEP = [  # token-serial form: chunk = unrolled tokens, tile = channels per program
    ms.BlockSizes(chunk=8, tile=32, segment_chunks=32, num_warps=1),
    ms.BlockSizes(chunk=8, tile=64, segment_chunks=32, num_warps=2),
    ms.BlockSizes(chunk=8, tile=128, segment_chunks=32, num_warps=4),
    ms.BlockSizes(chunk=16, tile=32, segment_chunks=16, num_warps=1),
    ms.BlockSizes(chunk=8, tile=32, segment_chunks=64, num_warps=1),
    ms.BlockSizes(chunk=4, tile=32, segment_chunks=64, num_warps=1),
    ms.BlockSizes(chunk=8, tile=64, segment_chunks=16, num_warps=1),
]


def sweep_serial(length, budget_s):
  """fwd and fwd+bwd of the token-serial kernels per block size."""
  t_start = time.perf_counter()
  rows = []
  for bs in SERIAL_SWEEP:
    if time.perf_counter() - t_start > budget_s:
      print("  serial sweep: budget spent", flush=True)
      break
    for backward in (False, True):
      t = time_point(functools.partial(serial_core, block_sizes=bs), length, backward)
      rows.append(("serial fwd+bwd" if backward else "serial fwd", bs, t))
      print(f"{rows[-1][0]} {bs}: {t * 1e3:.3f} ms", flush=True)
  return rows


def sweep(length, budget_s):
  t_start = time.perf_counter()
  rows = []
  for bs in FWD_SWEEP:
    if time.perf_counter() - t_start > budget_s / 2:
      print("  fwd sweep: budget spent", flush=True)
      break
    t = time_point(functools.partial(ms.gated_modal_scan, block_sizes=bs), length, False)
    rows.append(("fwd", bs, t))
    print(f"fwd {bs}: {t * 1e3:.3f} ms", flush=True)
  finite = [r for r in rows if np.isfinite(r[2])]
  best_fwd = min(finite, key=lambda r: r[2])[1] if finite else ms.DEFAULT_FWD
  for bs in BWD_SWEEP:
    if time.perf_counter() - t_start > budget_s:
      print("  bwd sweep: budget spent", flush=True)
      break
    t = time_point(functools.partial(ms.gated_modal_scan, block_sizes=best_fwd,
                                     bwd_block_sizes=bs), length, True)
    rows.append(("fwd+bwd", bs, t))
    print(f"fwd+bwd (fwd {best_fwd.chunk}/{best_fwd.tile}/{best_fwd.segment_chunks}) "
          f"bwd {bs}: {t * 1e3:.3f} ms", flush=True)
  return rows


def table(lengths, bs_fwd, bs_bwd, bs_serial, bandwidth):
  rows = []
  for length in lengths:
    for name, f in impls(bs_fwd, bs_bwd, bs_serial).items():
      for backward in (False, True):
        t = time_point(f, length, backward)
        seg = name.startswith("modal")
        floor = bytes_moved(length, 2, backward, False) / bandwidth
        rows.append(dict(length=length, impl=name, pass_="fwd+bwd" if backward else "fwd",
                         ms=t * 1e3, floor_ms=floor * 1e3,
                         bytes_gb=bytes_moved(length, 2, backward, seg) / 1e9))
        print(f"L={length} {name} {rows[-1]['pass_']}: {t * 1e3:.3f} ms "
              f"(floor {floor * 1e3:.3f} ms)", flush=True)
  return rows


# ----------------------------------------------------------------------------- fast variants

FB = mf.FastBlocks
VARIANTS = [  # the default first, the likeliest next; each differs from it in one or two knobs
    FB(),                                          # 0: t128 c8 seg512 w4, fused backward (horner)
    FB(segment=256),                               # 1: 2x the programs (less wave tail)
    FB(tile=256, bwd_tile=128),                    # 2: 2 channels per lane forward
    FB(chunk=16),                                  # 3: twice the loads in flight
    FB(fuse_adjoint=False),                        # 4: the backward's third pass
    FB(horner=False),                              # 5: adjoint start states token by token
    FB(segment=1024),                              # 6
    FB(prefetch=False),                            # 7: does the prefetch matter?
    FB(tile=64, num_warps=2),                      # 8
    FB(chunk=4),                                   # 9
    FB(tile=256, segment=256, bwd_tile=128),       # 10
    FB(tile=128, num_warps=2, bwd_warps=4),        # 11: 2 channels per lane forward
    FB(tile=256, num_warps=8),                     # 12
    FB(segment=2048),                              # 13
    FB(tile=64, num_warps=2, segment=256),         # 14
    FB(tile=512, bwd_tile=128),                    # 15: 4 channels per lane forward
]


def fast_core(*args, block_sizes=None, poison=False):
  return mf.gated_modal_fast(*args, block_sizes=block_sizes, poison=poison)


def max_rel(out, ref):
  """Max relative error over y and the six gradients (nan when any element is non-finite)."""
  pairs = [(out[0], ref[0])] + list(zip(out[1], ref[1]))
  return max(rel(a, b) for a, b in pairs)


CHECK_SHAPE = dict(length=3001, width=200, batch=2)   # odd: no multiple of any block size
VARIANT_S = 12.0  # about what one variant costs (compiles, check, timing): the budget's margin


def stages(bs, length, bandwidth, left):
  """Each launch of the fast kernels alone, jitted on inputs of the right shapes: ms and % of
  the launch's own floor (the [L, D] bf16 arrays it moves, at the copy rate)."""
  x1, v, x2, lam, res, dsk, dy = inputs(length)
  rows = []
  for blocks in (bs, bs.backward()):
    geo = mfl.make_geometry(x1.shape, lam.shape, blocks)
    lam_t, res_t, skip = mfl.pad_params(geo, lam, res, dsk)
    shape = (1, geo.num_segments, N, geo.padded_channels)
    seg = jnp.zeros(shape, jnp.float32)
    ends = jnp.zeros((1, geo.num_segments - 1) + shape[2:], jnp.float32)
    s0 = jnp.zeros((1,) + shape[2:], jnp.float32)
    if blocks is bs:
      todo = [("ends (x1, v)", 2, lambda *a: mf.launch_ends(geo, *a, False), (lam_t, x1, v)),
              ("ends + p (x1, v)", 2, lambda *a: mf.launch_ends(geo, *a, True), (lam_t, x1, v)),
              ("scan", 0, lambda *a: mfl.scan_segments(geo, *a, None, False, False),
               (lam_t, s0, ends)),
              ("scan + p", 0, lambda *a: mfl.scan_segments(geo, *a, False, False),
               (lam_t, s0, ends, ends)),
              ("fwd (x1, v, x2 -> y)", 4, functools.partial(mf.launch_fwd, geo),
               (lam_t, res_t, skip, seg, x1, v, x2))]
    else:
      todo = [("grads (x1, v, x2, dy -> dx2)", 5,
               lambda *a: mfb.launch_grads(geo, *a, bs.fuse_adjoint),
               (lam_t, res_t, skip, seg, seg, s0, x1, v, x2, dy)),
              ("adjoint ends (x2, dy)", 2, functools.partial(mfb.launch_adjoint_ends, geo),
               (lam_t, res_t, x2, dy)),
              ("scan adjoint", 0, lambda *a: mfl.scan_adjoint(geo, *a, False, False),
               (lam_t, s0, ends)),
              ("adjoint (x1, v, x2, dy -> dx1, dv)", 6,
               functools.partial(mfb.launch_adjoint, geo),
               (lam_t, res_t, skip, seg, x1, v, x2, dy))]
    for name, arrays, fn, args in todo:
      if left() < VARIANT_S / 2:
        print(f"  stage {name}: skipped (budget spent)", flush=True)
        continue
      try:
        t = timeit(jax.jit(fn), *args, samples=9)
      except Exception as err:  # noqa: BLE001
        print(f"  stage {name}: failed: {short_error(err, 300)}", flush=True)
        continue
      floor = arrays * length * D * 2 / bandwidth
      rows.append(dict(stage=name, ms=t * 1e3, floor_ms=floor * 1e3))
      print(f"  stage {blocks.label()} {name}: {t * 1e3:.3f} ms"
            + (f" ({floor / t:.0%} of its {arrays}-array floor)" if arrays else ""), flush=True)
  return rows


def variants(budget_s: float, lengths, bandwidth, picks=None):
  """Check and time every variant (or those at the indices ``picks``) at lengths[0] within the
  budget, each launch of the fastest alone, then the two fastest (forward+backward) at the
  other lengths."""
  t_start = time.perf_counter()
  left = lambda: budget_s - (time.perf_counter() - t_start)
  # exactness in float32 on an odd shape (L, D not multiples of the blocks, B = 2), default
  # blocks; every variant is then checked in bf16 at the timing shape
  shape = CHECK_SHAPE
  for bs in VARIANTS[:1]:
    args = inputs(shape["length"], key=3, dtype=jnp.float32, batch=shape["batch"],
                  width=shape["width"])
    try:
      ref = fwd_bwd_fn(impls()["fft"])(*args)
      out = fwd_bwd_fn(functools.partial(fast_core, block_sizes=bs, poison=True))(*args)
      print(f"check f32 B={shape['batch']} L={shape['length']} D={shape['width']} {bs.label()}: "
            f"max rel err {max_rel(out, ref):.1e}", flush=True)
    except Exception as err:  # noqa: BLE001
      print(f"check f32 {bs.label()} failed: {short_error(err, 400)}", flush=True)
  rows = []
  refs = {}
  stage_rows = []
  for length in lengths:
    if length != lengths[0]:
      ok = sorted((r for r in rows if np.isfinite(r["fwd_bwd_ms"])),
                  key=lambda r: r["fwd_bwd_ms"])
      if ok and not stage_rows:
        print(f"launches of the fastest at L={lengths[0]}, {ok[0]['variant']}:", flush=True)
        stage_rows = stages(ok[0]["bs"], lengths[0], bandwidth, left)
      todo = [r["bs"] for r in ok[:2]]
    else:
      todo = VARIANTS if picks is None else [VARIANTS[i] for i in picks]
    args = inputs(length)
    floor_f = 4 * length * D * 2 / bandwidth
    floor_fb = 11 * length * D * 2 / bandwidth
    for bs in todo:
      if left() < VARIANT_S:
        print(f"L={length} {bs.label()}: skipped (budget spent)", flush=True)
        continue
      f = functools.partial(fast_core, block_sizes=bs)
      row = dict(length=length, variant=bs.label(), bs=bs, err=float("nan"),
                 fwd_ms=float("nan"), fwd_bwd_ms=float("nan"))
      try:
        if length not in refs:
          refs[length] = jax.block_until_ready(fwd_bwd_fn(impls()["fft"])(*args))
        fb = fwd_bwd_fn(f)
        row["err"] = max_rel(jax.block_until_ready(fb(*args)), refs[length])
        row["fwd_bwd_ms"] = timeit(fb, *args, samples=9) * 1e3
        row["fwd_ms"] = timeit(fwd_fn(f), *args, samples=9) * 1e3
      except Exception as err:  # noqa: BLE001 — report and carry on with the other variants
        print(f"L={length} {bs.label()}: failed: {short_error(err, 300)}", flush=True)
      rows.append(row)
      print(f"L={length} {bs.label()}: err {row['err']:.1e}  fwd {row['fwd_ms']:.3f} ms "
            f"({floor_f * 1e3 / row['fwd_ms']:.0%} of floor)  fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
            f"({floor_fb * 1e3 / row['fwd_bwd_ms']:.0%} of floor)  [{left():.0f} s left]",
            flush=True)
  print(f"\ncopy rate {bandwidth / 1e12:.2f} TB/s; floor = 4 (fwd) / 11 (fwd+bwd) [L, D] bf16 "
        "arrays at that rate\n")
  print("| L | variant (tile/chunk/segment/warps) | max rel err | fwd ms | fwd % floor | "
        "fwd+bwd ms | fwd+bwd % floor |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    ff = 4 * r["length"] * D * 2 / bandwidth * 1e3
    fbf = 11 * r["length"] * D * 2 / bandwidth * 1e3
    print(f"| {r['length']} | {r['variant']} | {r['err']:.1e} | {r['fwd_ms']:.3f} | "
          f"{ff / r['fwd_ms']:.0%} | {r['fwd_bwd_ms']:.3f} | {fbf / r['fwd_bwd_ms']:.0%} |")
  return dict(stages=stage_rows, rows=[{k: (dataclasses.asdict(v) if k == "bs" else v)
                                        for k, v in r.items()} for r in rows])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mode", choices=["sweep", "table", "all", "variants"], default="all",
                  help="sweep: block sizes at 16K; table: defaults at --lengths; all: both, the "
                       "table with the sweep's best block sizes")
  ap.add_argument("--lengths", default="16384,65536")
  ap.add_argument("--budget", type=float, default=150.0, help="sweep wall-clock budget (s)")
  ap.add_argument("--variants", default="",
                  help="--mode variants: indices into VARIANTS to run (default: all, in order)")
  ap.add_argument("--sweep_forms", default="chunked,serial",
                  help="which kernel forms to sweep (the others keep their default block sizes)")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
  result = {"device": dev.device_kind, "jax": jax.__version__}
  if args.mode == "variants":
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    picks = [int(x) for x in args.variants.split(",")] if args.variants else None
    result.update(copy_bandwidth=bw, variants=variants(args.budget, lengths, bw, picks))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "modal_scan_variants.json"), "w") as fh:
      json.dump(result, fh, indent=1, default=str)
    return
  for name, kw in (("check_f32", {}), ("check_bf16", dict(dtype=jnp.bfloat16, length=1500,
                                                             width=96, batch=1))):
    try:
      result[name] = check(**kw)
    except Exception as err:  # noqa: BLE001
      print(f"{name} failed: {short_error(err, 400)}", flush=True)
  bw = copy_bandwidth()
  result["copy_bandwidth"] = bw
  print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
  bs_fwd = bs_bwd = bs_serial = None
  if args.mode in ("sweep", "all"):
    forms = args.sweep_forms.split(",")
    rows = sweep(16384, args.budget) if "chunked" in forms else []
    result["sweep"] = [(p, dataclasses.asdict(bs), t) for p, bs, t in rows]
    ok = lambda p: [r for r in rows if r[0] == p and np.isfinite(r[2])]
    if ok("fwd"):
      bs_fwd = min(ok("fwd"), key=lambda r: r[2])[1]
    if ok("fwd+bwd"):
      bs_bwd = min(ok("fwd+bwd"), key=lambda r: r[2])[1]
    serial = sweep_serial(16384, args.budget / 2) if "serial" in forms else []
    result["sweep_serial"] = [(p, dataclasses.asdict(bs), t) for p, bs, t in serial]
    fin = [r for r in serial if r[0] == "serial fwd+bwd" and np.isfinite(r[2])]
    bs_serial = min(fin, key=lambda r: r[2])[1] if fin else None
    print(f"best fwd {bs_fwd}\nbest bwd {bs_bwd}\nbest serial {bs_serial}", flush=True)
    result["best"] = (str(bs_fwd), str(bs_bwd), str(bs_serial))
  lengths = [16384] if args.mode == "sweep" else [int(x) for x in args.lengths.split(",")]
  rows = table(lengths, bs_fwd, bs_bwd, bs_serial, bw)
  result["table"] = rows
  print("\n| L | impl | fwd ms | fwd+bwd ms | fwd floor ms | fwd+bwd floor ms |")
  print("|---|---|---|---|---|---|")
  for length in lengths:
    for name in ("modal_scan", "modal_serial", "xla_chunked", "fft"):
      f = next(r for r in rows if r["length"] == length and r["impl"] == name and
               r["pass_"] == "fwd")
      fb = next(r for r in rows if r["length"] == length and r["impl"] == name and
                r["pass_"] == "fwd+bwd")
      print(f"| {length} | {name} | {f['ms']:.3f} | {fb['ms']:.3f} | {f['floor_ms']:.3f} | "
            f"{fb['floor_ms']:.3f} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"modal_scan_{args.mode}.json"), "w") as fh:
    json.dump(result, fh, indent=1, default=str)


if __name__ == "__main__":
  main()
