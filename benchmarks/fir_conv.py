"""Benchmark of the gated FIR Pallas kernels against XLA's grouped convolution and FFT conv.

Width 4096, batch 1, bf16 in/out, SE (K=7) and MR (K=128) with 256 filter groups; the LI core
(float32 FFT of the modal filter) for scale. Forward and forward+backward medians, bytes moved
against the measured copy bandwidth (roofline %).

  python benchmarks/fir_conv.py --mode sweep            # tune block sizes at L=16K
  python benchmarks/fir_conv.py --mode full --out DIR   # table (markdown) + plot over L
  python benchmarks/fir_conv.py --mode check            # Triton and Mosaic GPU kernels vs XLA
  python benchmarks/fir_conv.py --mode full --only pallas,pallas_mgpu   # the two side by side
  python benchmarks/fir_conv.py --mode mgpu_sweep       # Mosaic GPU block sizes at L=16K
  python benchmarks/fir_conv.py --mode mgpu_variants    # Mosaic GPU kernel variants at L=16K
  python benchmarks/fir_conv.py --mode featurizer       # does fusing the featurizer pay?
  python benchmarks/fir_conv.py --mode all --out DIR    # sweep, then the table with the best
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sh2_jax.kernels.fir_conv import BlockSizes, gated_fir_conv  # noqa: E402
from sh2_jax.kernels.fir_layout import default_block_sizes  # noqa: E402
from sh2_jax import dispatch  # noqa: E402
from sh2_jax.ops import fir  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

D, G = 4096, 256
LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536, 131072]


def timeit(fn, *args, target_s=0.04, samples=9):
  """Median seconds per call: warm-up (compile) excluded, back-to-back async calls per sample."""
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  est = time.perf_counter() - t0
  reps = int(min(50, max(1, target_s / max(est, 1e-6))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


def inputs(length, taps, key=0, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(key), 6)
  x1, v, x2, dy = (jax.random.normal(k, (1, length, D), dtype) for k in ks[:4])
  h = jax.random.normal(ks[4], (G, taps), jnp.float32) / np.sqrt(taps)
  dskip = jax.random.normal(ks[5], (D,), jnp.float32)
  return x1, v, x2, h, dskip, dy


def fwd_and_fwdbwd(op):
  """Jitted forward and forward+backward (y and all gradients) of op(x1, v, x2, h, dskip)."""
  f = jax.jit(op)

  def fb(x1, v, x2, h, dskip, dy):
    y, vjp = jax.vjp(op, x1, v, x2, h, dskip)
    return y, vjp(dy)
  return f, jax.jit(fb)


def ops(taps, bs=None, bs_bwd=None):
  return {
      "pallas": lambda x1, v, x2, h, d: gated_fir_conv(x1, v, x2, h, d, block_sizes=bs,
                                                       bwd_block_sizes=bs_bwd),
      "pallas_mgpu": lambda x1, v, x2, h, d: dispatch.gated_fir(x1, v, x2, h, d, "pallas_mgpu"),
      "xla": lambda x1, v, x2, h, d: dispatch.gated_fir(x1, v, x2, h, d, "xla"),
      "fft": lambda x1, v, x2, h, d: dispatch.gated_fir(x1, v, x2, h, d, "fft"),
  }


def li_op(x1, v, x2, h, d):
  del h
  n = 16
  lam = -jnp.exp(jnp.linspace(-9.0, 0.0, n))[None].repeat(D, 0)
  res = jnp.ones((D, n), jnp.float32) / n
  return dispatch.gated_modal(x1, v, x2, lam, res, d, "fft")


def copy_bandwidth():
  x = jax.random.normal(jax.random.key(7), (1 << 29,), jnp.bfloat16)  # 1 GiB
  t = timeit(jax.jit(lambda a: a + 1), x)
  return 2 * x.nbytes / t


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(length=16384):
  """Defaults of both kernel families vs the XLA reference on the benchmark shape (fwd, grads)."""
  for taps in (7, 128):
    x1, v, x2, h, dskip, dy = inputs(length, taps, key=3)
    fr, fbr = fwd_and_fwdbwd(ops(taps)["xla"])
    yr, gr = fbr(x1, v, x2, h, dskip, dy)
    for kind in ("pallas", "pallas_mgpu"):
      fp, fbp = fwd_and_fwdbwd(ops(taps)[kind])
      try:
        y, gp = fbp(x1, v, x2, h, dskip, dy)
      except Exception as e:
        print(f"check {kind} K={taps}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      errs = [rel(y, yr)] + [rel(a, b) for a, b in zip(gp, gr)]
      print(f"check {kind} K={taps} L={length}: rel err y,dx1,dv,dx2,dh,ddskip = "
            + ", ".join(f"{e:.1e}" for e in errs), flush=True)


def sweep(length=16384):
  se = [
      BlockSizes(32, 64, 16, 64, True, 4, 2), BlockSizes(32, 64, 16, 32, True, 4, 3),
      BlockSizes(32, 128, 16, 64, True, 8, 2), BlockSizes(32, 32, 16, 64, True, 4, 2),
      BlockSizes(16, 64, 16, 128, True, 4, 2), BlockSizes(16, 128, 16, 128, True, 4, 3),
      BlockSizes(64, 64, 16, 32, True, 4, 2), BlockSizes(64, 64, 16, 32, True, 8, 2),
      BlockSizes(32, 64, 16, 64, False, 4, 2), BlockSizes(32, 64, 16, 16, True, 4, 2),
  ]
  mr = [
      BlockSizes(128, 16, 16, 16, True, 4, 2), BlockSizes(128, 16, 16, 32, True, 4, 3),
      BlockSizes(128, 32, 16, 16, True, 4, 2), BlockSizes(128, 32, 16, 16, True, 8, 2),
      BlockSizes(128, 64, 16, 16, True, 8, 2), BlockSizes(128, 64, 16, 16, False, 4, 2),
      BlockSizes(128, 32, 16, 16, False, 4, 2), BlockSizes(128, 16, 16, 8, True, 8, 2),
  ]
  se_b = [
      BlockSizes(32, 64, 16, 64, True, 4, 2), BlockSizes(32, 32, 16, 64, True, 4, 2),
      BlockSizes(32, 64, 16, 64, True, 8, 2), BlockSizes(16, 64, 16, 128, True, 4, 2),
      BlockSizes(32, 64, 16, 64, False, 4, 2), BlockSizes(64, 32, 16, 32, True, 4, 2),
  ]
  mr_b = [
      BlockSizes(128, 16, 16, 16, True, 8, 1), BlockSizes(128, 16, 16, 16, True, 4, 1),
      BlockSizes(128, 16, 16, 16, True, 8, 2), BlockSizes(128, 32, 16, 16, False, 8, 1),
      BlockSizes(128, 16, 16, 16, True, 8, 1, rebuild=True),
      BlockSizes(128, 16, 16, 32, True, 8, 1, rebuild=True),
  ]
  floor_f = 4 * length * D * 2
  floor_b = 7 * length * D * 2
  best = {}
  for taps, fwd_list, bwd_list in ((7, se, se_b), (128, mr, mr_b)):
    x1, v, x2, h, dskip, dy = inputs(length, taps)
    res_f, res_b = [], []
    for bs in fwd_list:
      try:
        t = timeit(jax.jit(ops(taps, bs)["pallas"]), x1, v, x2, h, dskip)
        res_f.append((t, bs))
        print(f"fwd K={taps:3d} {bs}: {t * 1e3:.3f} ms  {floor_f / t / 1e12:.2f} TB/s", flush=True)
      except Exception as e:  # a variant that does not compile (registers, smem) is reported
        print(f"fwd K={taps:3d} {bs}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    bs_f = min(res_f, key=lambda r: r[0])[1] if res_f else None
    tf = timeit(jax.jit(ops(taps, bs_f)["pallas"]), x1, v, x2, h, dskip)
    for bs in bwd_list:
      try:
        _, fb = fwd_and_fwdbwd(ops(taps, bs_f, bs)["pallas"])
        t = timeit(fb, x1, v, x2, h, dskip, dy) - tf
        res_b.append((t, bs))
        print(f"bwd K={taps:3d} {bs}: {t * 1e3:.3f} ms  {floor_b / t / 1e12:.2f} TB/s", flush=True)
      except Exception as e:
        print(f"bwd K={taps:3d} {bs}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    bs_b = min(res_b, key=lambda r: r[0])[1] if res_b else None
    best[taps] = (bs_f, bs_b)
    print(f"best K={taps}: fwd {bs_f}, bwd {bs_b}", flush=True)
  return best


def featurizer(length=16384):
  """What fusing the featurizer could save: XLA featurizer + split + kernel vs the kernel."""
  z = jax.random.normal(jax.random.key(1), (1, length, 3 * D), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (3 * D, 3), jnp.float32)
  for taps in (7, 128):
    _, _, _, h, dskip, _ = inputs(length, taps)
    op = ops(taps)["pallas"]

    def full(z, w, h, d):
      x2, x1, v = fir.interleaved_split(fir.featurizer_conv(z, w))
      return op(x1, v, x2, h, d)
    split = jax.jit(lambda z, w: fir.interleaved_split(fir.featurizer_conv(z, w)))
    x2, x1, v = split(z, w)
    t_full = timeit(jax.jit(full), z, w, h, dskip)
    t_feat = timeit(split, z, w)
    t_k = timeit(jax.jit(op), x1, v, x2, h, dskip)
    floor = (3 + 1) * length * D * 2 / 1e12
    print(f"featurizer K={taps}: featurizer+split {t_feat * 1e3:.3f} ms, kernel {t_k * 1e3:.3f} "
          f"ms, both in one jit {t_full * 1e3:.3f} ms; fused floor (read z once, write y) "
          f"{floor:.3f} TB", flush=True)


def ab(length=16384):
  """The forward with and without the hand prefetch, same machine, same run."""
  for taps in (7, 128):
    x1, v, x2, h, dskip, _ = inputs(length, taps)
    base = default_block_sizes(taps)
    for pf in (True, False):
      bs = dataclasses.replace(base, prefetch=pf)
      t = timeit(jax.jit(ops(taps, bs)["pallas"]), x1, v, x2, h, dskip)
      print(f"fwd K={taps:3d} {bs}: {t * 1e3:.3f} ms", flush=True)


def mgpu_sweep(length=16384):
  """Block sizes of the Mosaic GPU kernels at L=16K (untuned so far): pipeline depth and chunks
  per program; the channel tile is the group (16 at 256 groups)."""
  from sh2_jax.kernels import fir_conv_mgpu
  for taps in (7, 128):
    x1, v, x2, h, dskip, dy = inputs(length, taps)
    base = fir_conv_mgpu.default_block_sizes(D // G, taps)
    for stages in (2, 3, 4):
      for seg in (8, 16, 32, 64):
        bs = dataclasses.replace(base, stages=stages, seg_chunks=seg)
        op = functools.partial(fir_conv_mgpu.gated_fir_conv_mgpu, block_sizes=bs)
        f, fb = fwd_and_fwdbwd(lambda x1, v, x2, h, d, op=op: op(x1, v, x2, h, d))
        try:
          tf, tfb = timeit(f, x1, v, x2, h, dskip), timeit(fb, x1, v, x2, h, dskip, dy)
        except Exception as e:
          print(f"mgpu K={taps} {bs}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        print(f"mgpu K={taps:3d} {bs}: fwd {tf * 1e3:.3f} ms, fwd+bwd {tfb * 1e3:.3f} ms",
              flush=True)


@jax.jit
def rel_dev(xs, refs):
  """Relative L2 errors, on the device (the arrays are 128 MB each at 16K)."""
  f = lambda a: a.astype(jnp.float32)
  return [jnp.linalg.norm(f(a) - f(b)) / jnp.linalg.norm(f(b)) for a, b in zip(xs, refs)]


@jax.jit
def wrong_elements(a, ref):
  """Elements off by more than bf16 rounding allows (|a - ref| > 0.05 |ref| + 0.05): a norm
  hides a few thousand wrong ones among 10^8 (the prologue race of RESULTS, "FIR defaults at
  16K-128K"); this count does not."""
  a, ref = a.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.sum(jnp.abs(a - ref) > 0.05 * jnp.abs(ref) + 0.05)


def per_sm(smem_bytes):
  """Programs one H100/H200 SM holds by shared memory (228 KiB, 1 KiB reserved per block)."""
  return 228 * 1024 // (smem_bytes + 1024)


def mgpu_variant_list(taps):
  """(name, forward MgpuBlockSizes, backward MgpuBlockSizes) of the Mosaic GPU variants timed
  by ``--mode mgpu_variants``: the default first, then from the first choice ring windows,
  double-buffered stores (s2), segment length, pipeline stages (st), channel tiles per program
  (t<fwd>/<bwd>) and wide boxes, alone and combined, then changes of the default (the old
  default, program length, stages)."""
  from sh2_jax.kernels import fir_conv_mgpu, fir_layout_mgpu
  first = fir_conv_mgpu.default_block_sizes(D // G, taps)  # the variants' base: the first choice
  base = fir_conv_mgpu.MgpuBlockSizes(chunk=first.chunk, width=first.width)
  r = functools.partial(dataclasses.replace, base)
  fast = r(ring=True, store_slots=2)
  f = functools.partial(dataclasses.replace, fast)
  dflt = fir_conv_mgpu.default_block_sizes(D // G, taps, channels=D)
  dflt_b = fir_conv_mgpu.default_block_sizes(D // G, taps, backward=True, channels=D)
  d = functools.partial(dataclasses.replace, dflt)
  db = functools.partial(dataclasses.replace, dflt_b)
  return [(name, bs, bwd or bs) for name, bs, bwd in (
      ("default", dflt, dflt_b),
      ("first", base, None),
      ("ring", r(ring=True), None),
      ("ring+slots2", fast, None),
      ("ring st3", r(ring=True, stages=3), None),
      ("ring st4", r(ring=True, stages=4), None),
      ("ring seg128", r(ring=True, seg_chunks=128), None),
      ("ring st3 seg128", r(ring=True, stages=3, seg_chunks=128), None),
      ("r+s2 st3", f(stages=3), None),
      ("r+s2+t2", f(tiles=2), None),
      ("r+s2+t2 wide", f(tiles=2, wide=True), None),
      ("r+s2+t4/1 wide", f(tiles=4, wide=True), fast),
      ("ring t2/1 w seg64", r(ring=True, tiles=2, wide=True, seg_chunks=64),
       r(ring=True, seg_chunks=64)),
      ("ring t2/1 w st3 seg128", r(ring=True, tiles=2, wide=True, stages=3, seg_chunks=128),
       r(ring=True, stages=3, seg_chunks=128)),
      # the 2026-12-01 defaults (two tiles forward; SE backward 32-chunk, MR 128-chunk programs)
      ("t2 (old default)", d(tiles=2),
       db(seg_chunks=32 if fir_layout_mgpu.bands(taps, dflt_b.chunk) == 1 else 128)),
      ("t4 seg256", d(seg_chunks=256), dflt_b),
      ("t4 st2", d(stages=2), dflt_b),
      ("bwd st3 seg256", dflt, db(stages=3, seg_chunks=256)),
      ("bwd seg1024", dflt, db(seg_chunks=1024)),
  )]


def mgpu_variants(length=16384, only=None):
  """Each Mosaic GPU variant (MgpuBlockSizes switches) on the GPU: forward and all gradients
  against XLA (relative errors, and elements of y, dx1, dv, dx2 off by more than bf16 rounding:
  any makes the variant WRONG), then forward and forward+backward medians at ``length`` for SE and
  MR, as % of the floors at the copy rate measured here (forward: read x1, v, x2, write y;
  backward: read x1, v, x2, dy, write dx1, dv, dx2). One table; a variant that does not build
  prints one line and the run goes on. ``only``: a comma list of variant names."""
  from sh2_jax.kernels import fir_conv_mgpu
  names = [name for name, _, _ in mgpu_variant_list(7)]
  unknown = [name for name in (only or "").split(",") if name and name not in names]
  if length < 1:
    print(f"error: --length {length} is not a positive sequence length", file=sys.stderr)
    sys.exit(2)
  if unknown:
    print(f"error: --only {','.join(unknown)!r} names no variant; expected some of "
          f"{', '.join(names)}", file=sys.stderr)
    sys.exit(2)
  bw = copy_bandwidth()
  floor_f, floor_b = 4 * length * D * 2 / bw, 7 * length * D * 2 / bw
  print(f"copy {bw / 1e12:.2f} TB/s; floors at L={length}: fwd {floor_f * 1e3:.3f} ms, bwd "
        f"{floor_b * 1e3:.3f} ms, fwd+bwd {(floor_f + floor_b) * 1e3:.3f} ms", flush=True)
  rows = []
  for taps in (7, 128):
    args = inputs(length, taps, key=3)
    _, fbr = fwd_and_fwdbwd(ops(taps)["xla"])
    yr, gr = fbr(*args)
    ref = [yr, *gr]
    del fbr
    for name, bs, bs_b in mgpu_variant_list(taps):
      if only and name not in only.split(","):
        continue
      op = functools.partial(fir_conv_mgpu.gated_fir_conv_mgpu, block_sizes=bs,
                             bwd_block_sizes=bs_b)
      f, fb = fwd_and_fwdbwd(lambda x1, v, x2, h, d, op=op: op(x1, v, x2, h, d))
      sb = [fir_conv_mgpu.smem_bytes(bs, taps), fir_conv_mgpu.smem_bytes(bs_b, taps, True)]
      try:
        y, g = fb(*args)
        errs = [float(e) for e in rel_dev([y, *g], ref)]
        wrong = [int(wrong_elements(a, b)) for a, b in zip([y, *g[:3]], ref[:4])]
        tf = timeit(f, *args[:5], target_s=0.015, samples=11)
        tfb = timeit(fb, *args, target_s=0.015, samples=11)
      except Exception as e:  # a variant that does not build (smem, registers, PTX)
        msg = " ".join(str(e).split())[:160]
        print(f"K={taps:3d} {name:14s}: FAILED {type(e).__name__}: {msg}", flush=True)
        continue
      tb = max(tfb - tf, 1e-9)  # the backward alone (timing noise can make it tiny)
      ok = "ok" if max(errs) < 2e-2 and not any(wrong) else f"WRONG ({wrong} wrong elements)"
      rows.append((taps, name, tf, tfb, tb, errs, ok, sb))
      print(f"K={taps:3d} {name:14s}: fwd {tf * 1e3:.3f} ms ({100 * floor_f / tf:3.0f}%), "
            f"fwd+bwd {tfb * 1e3:.3f} ms, bwd {tb * 1e3:.3f} ms ({100 * floor_b / tb:3.0f}%), "
            f"max rel err {max(errs):.1e}, wrong elements y/dx1/dv/dx2 {wrong} {ok}", flush=True)
    del args, ref, yr, gr
  lines = [f"copy {bw / 1e12:.2f} TB/s, L={length}, D={D}, G={G}, bf16; floors fwd "
           f"{floor_f * 1e3:.3f} ms (4 arrays), bwd {floor_b * 1e3:.3f} ms (7 arrays)", "",
           "| K | variant | fwd ms | fwd % floor | fwd+bwd ms | bwd ms | bwd % floor | "
           "fwd+bwd % floor | rel err y, dx1, dv, dx2, dh, ddskip | smem KiB fwd/bwd "
           "(programs/SM) |", "|---|---|---|---|---|---|---|---|---|---|"]
  for taps, name, tf, tfb, tb, errs, ok, sb in rows:
    lines.append(f"| {taps} | {name} | {tf * 1e3:.3f} | {100 * floor_f / tf:.0f}% | "
                 f"{tfb * 1e3:.3f} | {tb * 1e3:.3f} | {100 * floor_b / tb:.0f}% | "
                 f"{100 * (floor_f + floor_b) / tfb:.0f}% | "
                 + ", ".join(f"{e:.1e}" for e in errs) + f" {ok} | {sb[0] // 1024}/"
                 f"{sb[1] // 1024} ({per_sm(sb[0])}/{per_sm(sb[1])}) |")
  for taps in (7, 128):
    for name, bs, bs_b in mgpu_variant_list(taps):
      lines.append(f"K={taps} {name}: forward {bs}" + ("" if bs_b == bs else f", backward {bs_b}"))
  print("\n".join(lines), flush=True)


def grid_fill():
  """Short sequences: segments shortened until the grid has min_programs programs, or not."""
  for length in (2048, 4096, 8192, 16384):
    for taps in (7, 128):
      x1, v, x2, h, dskip, dy = inputs(length, taps)
      for mp in (0, 528, 1056):  # 0 = off (the default)
        bs = dataclasses.replace(default_block_sizes(taps), min_programs=mp)
        bb = dataclasses.replace(default_block_sizes(taps, True), min_programs=mp)
        f, fb = fwd_and_fwdbwd(ops(taps, bs, bb)["pallas"])
        tf, tfb = timeit(f, x1, v, x2, h, dskip), timeit(fb, x1, v, x2, h, dskip, dy)
        print(f"grid L={length:6d} K={taps:3d} min_programs={mp:5d}: fwd {tf * 1e3:.3f} ms, "
              f"fwd+bwd {tfb * 1e3:.3f} ms", flush=True)


def full(out_dir, best=None, only=None):
  bw = copy_bandwidth()
  print(f"copy bandwidth {bw / 1e12:.2f} TB/s (bytes read + written)", flush=True)
  rows, series = [], {}
  names = [("SE pallas", 7, "pallas"), ("MR pallas", 128, "pallas"),
           ("SE mgpu", 7, "pallas_mgpu"), ("MR mgpu", 128, "pallas_mgpu"), ("SE xla", 7, "xla"),
           ("MR xla", 128, "xla"), ("FFT conv", 128, "fft"), ("LI fft", 128, "li")]
  for length in LENGTHS:
    floor_f = 4 * length * D * 2 / bw
    floor_fb = 11 * length * D * 2 / bw
    for name, taps, kind in names:
      if only and kind not in only.split(","):
        continue
      if kind == "xla" and length > 65536:
        continue  # tens of ms a call; the trend is clear by 64K
      args = inputs(length, taps)
      op = li_op if kind == "li" else ops(taps, *(best or {}).get(taps, (None, None)))[kind]
      f, fb = fwd_and_fwdbwd(op)
      try:
        tf = timeit(f, *args[:5])
        tfb = timeit(fb, *args)
      except Exception as e:
        print(f"{name} L={length}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      rows.append((name, length, tf, tfb, floor_f / tf, floor_fb / tfb))
      series.setdefault(name, []).append((length, tf, tfb))
      print(f"{name:10s} L={length:6d}: fwd {tf * 1e3:8.3f} ms ({100 * floor_f / tf:5.1f}% "
            f"roofline)  fwd+bwd {tfb * 1e3:8.3f} ms ({100 * floor_fb / tfb:5.1f}%)", flush=True)
      del args
  lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s; floors: fwd 4 x L x D x 2 B, fwd+bwd 11 x L x "
           "D x 2 B over that bandwidth", "",
           "| op | L | fwd ms | fwd+bwd ms | fwd+bwd / fwd | fwd % roofline | fwd+bwd % roofline |",
           "|---|---|---|---|---|---|---|"]
  for name, length, tf, tfb, rf, rfb in rows:
    lines.append(f"| {name} | {length // 1024}K | {tf * 1e3:.3f} | {tfb * 1e3:.3f} | "
                 f"{tfb / tf:.2f} | {100 * rf:.0f}% | {100 * rfb:.0f}% |")
  for taps, (bs_f, bs_b) in sorted((best or {}).items()):
    lines.append(f"\nK={taps}: forward {bs_f}; backward {bs_b}")
  table = "\n".join(lines)
  print(table)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fir_conv.md"), "w") as fh:
      fh.write(table + "\n")
    plot(series, os.path.join(out_dir, "fir_conv.png"))


def plot(series, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, idx, title in ((axes[0], 1, "forward"), (axes[1], 2, "forward + backward")):
    for name, pts in series.items():
      pts = sorted(pts)
      ax.loglog([p[0] for p in pts], [p[idx] * 1e3 for p in pts], "o-", label=name)
    ax.set_xlabel("sequence length L (D = 4096, B = 1, bf16)")
    ax.set_ylabel("ms")
    ax.set_title(f"gated conv core, {title}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--mode", default="full",
                 choices=["check", "sweep", "featurizer", "full", "all", "ab", "grid",
                          "mgpu_sweep", "mgpu_variants"])
  p.add_argument("--only", default=None,
                 help="full: time only these kinds, comma list (pallas, pallas_mgpu, xla, fft, "
                 "li); mgpu_variants: only these variants (names as printed)")
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--length", type=int, default=16384,
                 help="mgpu_variants: the sequence length (the targets: 16K, 64K, 128K)")
  a = p.parse_args()
  print(jax.devices(), flush=True)
  if a.mode == "check":
    check()
  elif a.mode == "sweep":
    check()
    sweep()
  elif a.mode == "all":  # sweep, then the table with the best variants
    full(a.out, sweep())
  elif a.mode == "mgpu_sweep":
    mgpu_sweep()
  elif a.mode == "mgpu_variants":
    mgpu_variants(a.length, only=a.only)
  elif a.mode == "grid":
    grid_fill()
  elif a.mode == "ab":
    ab()
  elif a.mode == "featurizer":
    featurizer()
  else:
    full(a.out, only=a.only)
