"""Shared memory of the gated FIR kernels: what the compiler allocates against ``footprint``, and
the speed of the block configurations that fit, on the GPU.

  # sizes from the compiler (launch statistics through Nsight Compute; overflows from XLA's error)
  ncu --clock-control none -k regex:gated_fir --metrics \
      launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,\
      launch__registers_per_thread --csv --print-units base \
      python benchmarks/fir_smem.py --mode sizes --out DIR > DIR/ncu.csv
  python benchmarks/fir_smem.py --mode join --out DIR     # sizes.jsonl + ncu.csv -> fir_smem.jsonl
  python benchmarks/fir_smem.py --mode time --out DIR     # the candidates' speed, per geometry

``--mode sizes`` compiles and launches once every candidate configuration of each geometry (in a
fixed order, one launch each, so the profiler's rows map to the cases) and records the
compiler's overflow message ("requested N") for the ones that do not compile. ``--mode time``
times forward and forward+backward of each candidate that compiles (median, warm-up excluded)
for the preset geometries, with the choice of ``choose_block_sizes`` marked.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_info, timeit  # noqa: E402
from sh2_jax.kernels import fir_conv as fc  # noqa: E402
from sh2_jax.kernels import fir_conv_bwd  # noqa: E402
from sh2_jax.kernels import fir_layout as fl  # noqa: E402
from sh2_jax import dispatch  # noqa: E402

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

# (D, G): channels per group 15 (evo2_1b), 16 (evo2_7b/20b/40b), 24, 32, 64, 1, 3
GEOMETRIES = [(1920, 128), (4096, 256), (3072, 128), (2048, 64), (1536, 24), (1024, 1024),
              (768, 256)]
TAPS = (7, 128)
DTYPES = (jnp.bfloat16, jnp.float32)


def arrays(shape, groups, taps, dtype, key=0):
  ks = jax.random.split(jax.random.key(key), 6)
  x1, v, x2, dy = (jax.random.normal(k, shape, dtype) for k in ks[:4])
  h = jax.random.normal(ks[4], (groups, taps), jnp.float32) / np.sqrt(taps)
  dskip = jax.random.normal(ks[5], (shape[2],), jnp.float32)
  return x1, v, x2, h, dskip, dy


def layout_key(lay: fl.Layout) -> tuple:
  bs = lay.bs
  return (bs.chunk, bs.tile, bs.width, bs.num_warps, bs.num_stages, bs.chunk_outer, bs.prefetch,
          lay.slots, lay.rebuild, lay.aligned, lay.seg_chunks)


def cases(length: int, max_per: int, geometries=GEOMETRIES):
  """(geometry, direction, BlockSizes) in a fixed order; candidates with the same launch layout
  are measured once."""
  for d, g in geometries:
    for taps in TAPS:
      for dtype in DTYPES:
        for backward in (False, True):
          shape = (1, length, d)
          seen = set()
          for bs in fl.candidates(taps, backward, dtype):
            lay = fl.make_layout(shape, (g, taps), bs, jnp.dtype(dtype).itemsize, backward)
            if layout_key(lay) in seen:
              continue
            seen.add(layout_key(lay))
            yield shape, g, taps, dtype, backward, bs, lay
            if len(seen) >= max_per:
              break


def describe(shape, g, taps, dtype, backward, lay) -> dict:
  bs = lay.bs
  fp = fl.footprint(lay, backward)
  return dict(D=shape[2], G=g, cpg=shape[2] // g, K=taps, dtype=jnp.dtype(dtype).name,
              dir="bwd" if backward else "fwd", chunk=bs.chunk, tile=bs.tile, width=bs.width,
              warps=bs.num_warps, stages=bs.num_stages, chunk_outer=bs.chunk_outer,
              prefetch=bs.prefetch, slots=lay.slots, rebuild=lay.rebuild, aligned=lay.aligned,
              est_smem=fp.smem, est_regs=fp.regs)


def launcher(backward: bool, bs):
  if backward:
    return jax.jit(lambda x1, v, x2, h, dk, dy: fir_conv_bwd.bwd(x1, v, x2, h, dk, dy, bs)[:3])
  return jax.jit(lambda x1, v, x2, h, dk, dy: fc.fwd(x1, v, x2, h, dk, bs))


def run_sizes(args):
  out = open(os.path.join(args.out, "sizes.jsonl"), "w")
  n_ok = 0
  geoms = [tuple(int(v) for v in s.split("x")) for s in args.geometries.split(",")]
  for shape, g, taps, dtype, backward, bs, lay in cases(args.length, args.max_per, geoms):
    row = describe(shape, g, taps, dtype, backward, lay)
    xs = arrays(shape, g, taps, dtype)
    try:
      jax.block_until_ready(launcher(backward, bs)(*xs))
      row.update(compiled=True, launch_index=n_ok)
      n_ok += 1
    except Exception as err:  # noqa: BLE001 - the compiler's message is the measurement
      msg = str(err)
      m = re.search(r"requested (\d+)", msg)
      row.update(compiled=False, requested=int(m.group(1)) if m else None,
                 error=msg.strip().splitlines()[0][:200] if msg.strip() else type(err).__name__)
    out.write(json.dumps(row) + "\n")
    out.flush()
    print(json.dumps(row), file=sys.stderr, flush=True)


def run_join(args):
  rows = [json.loads(x) for x in open(os.path.join(args.out, "sizes.jsonl"))]
  ncu_rows = []
  path = os.path.join(args.out, "ncu.csv")
  if os.path.exists(path):
    lines = [ln for ln in open(path) if ln.startswith('"')]
    reader = csv.DictReader(lines)
    by_id: dict[str, dict] = {}
    for r in reader:
      if "gated_fir" not in r.get("Kernel Name", ""):
        continue
      by_id.setdefault(r["ID"], {})[r["Metric Name"]] = r["Metric Value"]
    ncu_rows = [by_id[k] for k in sorted(by_id, key=int)]
  with open(os.path.join(args.out, "fir_smem.jsonl"), "w") as fh:
    for row in rows:
      i = row.get("launch_index")
      if row["compiled"] and i is not None and i < len(ncu_rows):
        m = ncu_rows[i]
        num = lambda s: int(float(str(s).replace(",", "")))  # noqa: E731
        row["smem"] = (num(m.get("launch__shared_mem_per_block_dynamic", 0))
                       + num(m.get("launch__shared_mem_per_block_static", 0)))
        row["regs"] = num(m.get("launch__registers_per_thread", 0))
      elif not row["compiled"]:
        row["smem"] = row.get("requested")
      fh.write(json.dumps(row) + "\n")
      print(row["cpg"], row["K"], row["dtype"], row["dir"], "aligned" if row["aligned"] else
            f"slots{row['slots']}", f"st{row['stages']}", "outer" if row["chunk_outer"] else
            "inner", "rebuild" if row["rebuild"] else "", "est", row["est_smem"], "got",
            row.get("smem"), "regs", row.get("regs"), "est", row["est_regs"])


def run_time(args):
  print(device_info())
  print("| D | G | K | dtype | config | est smem | fwd ms | fwd+bwd ms | chosen |")
  print("|---|---|---|---|---|---|---|---|---|")
  for d, g in ((1920, 128), (4096, 256)):
    for taps in TAPS:
      dtype = jnp.bfloat16
      shape = (args.batch, args.length, d)
      x1, v, x2, h, dk, dy = arrays(shape, g, taps, dtype)
      chosen = (fc.choose_block_sizes(shape, (g, taps), dtype),
                fc.choose_block_sizes(shape, (g, taps), dtype, backward=True))
      tried = []
      for bs in fl.candidates(taps, False, dtype)[:args.max_per]:
        lay = fl.make_layout(shape, (g, taps), bs, 2)
        if layout_key(lay) in tried:
          continue
        tried.append(layout_key(lay))
        bb = dataclasses.replace(chosen[1])
        f = jax.jit(lambda a, b, c, hh, dd, bs=bs, bb=bb: fc.gated_fir_conv(
            a, b, c, hh, dd, block_sizes=bs, bwd_block_sizes=bb))
        fb = jax.jit(jax.grad(lambda a, b, c, hh, dd, bs=bs, bb=bb: jnp.sum(fc.gated_fir_conv(
            a, b, c, hh, dd, block_sizes=bs, bwd_block_sizes=bb).astype(jnp.float32) * dy),
            argnums=(0, 1, 2, 3, 4)))
        try:
          tf = timeit(f, x1, v, x2, h, dk)
          tb = timeit(fb, x1, v, x2, h, dk)
          res = f"{tf * 1e3:.3f} | {tb * 1e3:.3f}"
        except Exception as err:  # noqa: BLE001
          res = f"{type(err).__name__} | {str(err).splitlines()[0][:60]}"
        desc = describe(shape, g, taps, dtype, False, lay)
        name = (f"{'aligned' if lay.aligned else 'slots%d' % lay.slots} st{lay.bs.num_stages} "
                f"{'outer' if lay.bs.chunk_outer else 'inner'}{' rebuild' if lay.rebuild else ''}")
        print(f"| {d} | {g} | {taps} | bf16 | {name} | {desc['est_smem']} | {res} | "
              f"{'yes' if bs == chosen[0] else ''} |", flush=True)
      for impl in ("xla",):
        f = jax.jit(lambda a, b, c, hh, dd: dispatch.gated_fir(a, b, c, hh, dd, impl))
        fb = jax.jit(jax.grad(lambda a, b, c, hh, dd: jnp.sum(dispatch.gated_fir(
            a, b, c, hh, dd, impl).astype(jnp.float32) * dy), argnums=(0, 1, 2, 3, 4)))
        print(f"| {d} | {g} | {taps} | bf16 | {impl} | – | {timeit(f, x1, v, x2, h, dk) * 1e3:.3f}"
              f" | {timeit(fb, x1, v, x2, h, dk) * 1e3:.3f} | |", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=("sizes", "join", "time"), required=True)
  p.add_argument("--out", default="fir_smem_out")
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--max_per", type=int, default=6, help="candidates per geometry and direction")
  p.add_argument("--geometries", default=",".join(f"{d}x{g}" for d, g in GEOMETRIES),
                 help="DxG,... for --mode sizes")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  {"sizes": run_sizes, "join": run_join, "time": run_time}[args.mode](args)


if __name__ == "__main__":
  main()
