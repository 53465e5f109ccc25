"""Training-step throughput: the Evo 2 7B layout against a Transformer of equal width/depth/MLP.

One full step — forward, backward, AdamW (global-norm clipping, weight-decay mask) — through the
trainer's own ``sh2_jax.train.step.train_step``: float32 master weights, bf16 compute, donated
parameter/optimizer buffers, cuDNN attention, the Pallas FIR kernels, batch 1. Tokens/s and MFU
against the bf16 GEMM rate measured in the same process; model FLOPs from ``sh2_jax.flops``
(6·N·T plus 6·L²·D per attention layer per sequence; rematerialisation is not counted).

  # one GPU, reduced width (the 7B layout's 32 layers at width 2048):
  python benchmarks/train_step.py --width 2048 --layers 32 --out DIR
  # two GPUs: context parallelism over both, parameters and optimizer state sharded over the
  # same two ranks (FSDP), at the true 7B width with fewer layers:
  python benchmarks/train_step.py --cp 2 --width 4096 --layers 7 --out DIR
  python benchmarks/train_step.py --smoke            # CPU plumbing check
  python benchmarks/train_step.py --plot DIR/train_step.jsonl

``--remat auto`` (the default) runs each model at the fastest rematerialisation setting that
fits the card: ``none``, then ``dots``, then ``blocks``, each compiled before anything is
allocated and taken when XLA's memory analysis of the compiled step (arguments + temporaries +
output - donated) is within the allocator's limit, then tried: a setting whose first step runs
out of memory falls through to the next. The row records the setting and every total tried.
The allocator gets ``--mem_fraction`` of the card (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.92 by
default: JAX's own default, 0.75, hid 35 GiB of the H200 and sent 128K steps that fit the card
to ``blocks``).

The points run in priority order (``--lengths``) and a point whose predicted cost exceeds the
time left (``--budget_s``) is skipped with a note, so a hard-limited call still prints its table.
``--profile_len`` traces two steps of each model at that length (jax.profiler) and prints the
GPU time per kernel class and the top kernels.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks.profiling import fusion_report, profile_summary  # noqa: E402
from benchmarks.transformer import evo2_7b_layout, transformer_like  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

OPT = types.SimpleNamespace(learning_rate=1e-4, warmup_steps=10, min_lr_ratio=0.1,
                            weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
                            grad_accum_steps=1, decay_embedding=True)


def li_impl_choice(requested: str) -> str:
  """``best`` is the config's ``auto`` (``dispatch.resolve_li_impl``: on GPU by length); any
  other name is checked and kept."""
  from sh2_jax import dispatch
  requested = "auto" if requested == "best" else requested
  dispatch.resolve_li_impl(requested)
  return requested


def li_impl_used(li: str, length: int) -> str:
  """The LI implementation a step at ``length`` tokens runs (``auto`` resolved)."""
  from sh2_jax import dispatch
  return dispatch.resolve_li_impl(li, length=length)


REMAT_ORDER = ("none", "dots", "blocks")  # fastest first: less recomputation, more memory
FIT_SHARE = 1.0  # of the allocator's limit, left to the step's total (then tried: see run)
MEM_FRACTION = 0.92  # of the card's memory for the allocator (XLA_PYTHON_CLIENT_MEM_FRACTION)


def device_memory_limit() -> int | None:
  """The allocator's limit of the first local device in bytes (None where unknown: CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def remat_candidates(requested: str, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
  """``auto``: every setting, fastest first (the first whose compiled step fits is taken),
  less those in ``skip`` (tried and out of memory)."""
  order = REMAT_ORDER if requested == "auto" else (requested,)
  return tuple(r for r in order if r not in skip)


class Point:
  """One model at one length: compiled step, live state, timings."""

  def __init__(self, cfg, length: int, remat: str, mesh, seed: int = 0,
               skip: tuple[str, ...] = ()):
    """``remat``: a setting, or ``auto``: the fastest not in ``skip`` whose compiled step
    (XLA's memory analysis: arguments + temporaries + output - donated) fits the device; each
    setting tried is in ``self.memory`` (bytes per device)."""
    from flax import nnx
    from sh2_jax.model import StripedHyena
    from sh2_jax.train import mesh as mesh_lib
    from sh2_jax.train.optim import make_optimizer
    from sh2_jax.train.step import compiler_options, train_step

    self.cfg, self.length = cfg, length
    abstract = nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    tx = make_optimizer(OPT, 1000)
    if mesh is None:
      p_sh = o_sh = b_sh = repl = None
    else:
      specs = mesh_lib.param_specs(abstract)  # FSDP over fsdp x context: the context ranks
      p_sh = mesh_lib.param_shardings(mesh, abs_params, specs)
      abs_opt = jax.eval_shape(tx.init, abs_params)
      repl = mesh_lib.replicated(mesh)
      o_sh = mesh_lib.opt_state_shardings(mesh, tx, abs_opt, p_sh)
      b_sh = {k: mesh_lib.batch_sharding(mesh) for k in ("inputs", "targets", "weights")}

    b_shape = {k: jax.ShapeDtypeStruct((1, length), jnp.float32 if k == "weights" else jnp.int32,
                                       sharding=None if b_sh is None else b_sh[k])
               for k in ("inputs", "targets", "weights")}
    abstract_args = (abs_params, jax.eval_shape(tx.init, abs_params))
    if p_sh is not None:
      abstract_args = jax.tree.map(
          lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract_args,
          (p_sh, o_sh))
    kw = {} if mesh is None else dict(in_shardings=(p_sh, o_sh, b_sh),
                                      out_shardings=(p_sh, o_sh, repl))
    limit = device_memory_limit()
    self.memory: dict[str, int] = {}
    t0 = time.perf_counter()
    for r in remat_candidates(remat, skip):  # compile before anything is allocated
      step = functools.partial(train_step, graphdef=graphdef, tx=tx, remat=r, accum=1,
                               mesh=mesh)
      # the trainer's XLA options (the latency-hiding scheduler off on a context mesh)
      jitted = jax.jit(step, donate_argnums=(0, 1),
                       compiler_options=compiler_options(mesh) or None, **kw)
      compiled = jitted.lower(*abstract_args, b_shape).compile()
      ma = compiled.memory_analysis()
      self.memory[r] = (ma.argument_size_in_bytes + ma.temp_size_in_bytes
                        + ma.output_size_in_bytes - ma.alias_size_in_bytes)
      if limit is None or self.memory[r] <= FIT_SHARE * limit:
        self.remat, self.compiled = r, compiled
        break
    else:
      gib = {k: round(v / 2**30, 1) for k, v in self.memory.items()}
      raise MemoryError(f"no remat setting fits the device ({(limit or 0) / 2**30:.0f} GiB): "
                        f"compiled totals {gib} GiB")
    self.compile_s = time.perf_counter() - t0
    # eager init (each op compiled once per shape), then shard: a jitted init of the whole
    # model compiled for minutes at 32 layers (benchmarks/RESULTS.md, "Training step")
    params = nnx.to_pure_dict(nnx.state(StripedHyena(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    self.params = jax.device_put(params, p_sh) if p_sh is not None else params
    self.opt_state = jax.jit(tx.init, out_shardings=o_sh)(self.params)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 256, size=(1, length + 1), dtype=np.int32)  # bytes, as in training
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "weights": np.ones((1, length), np.float32)}
    self.batch = (jax.device_put(batch) if mesh is None else
                  {k: jax.device_put(v, b_sh[k]) for k, v in batch.items()})
    # a second random batch, never trained on: its loss must stay near ln 256 = 5.55 (uniform
    # bytes carry no information); a training loss far below it with this one near it is
    # memorisation, both far below it a causality leak
    from sh2_jax.train.step import eval_step
    toks = rng.integers(0, 256, size=(1, length + 1), dtype=np.int32)
    held = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "weights": np.ones((1, length), np.float32)}
    self.heldout = (jax.device_put(held) if mesh is None else
                    {k: jax.device_put(v, b_sh[k]) for k, v in held.items()})
    self.eval = jax.jit(functools.partial(eval_step, graphdef=graphdef, mesh=mesh))

  def heldout_loss(self) -> float:
    m = self.eval(self.params, self.heldout)
    return float(m["nll"] / m["tokens"])

  def run(self, n: int) -> float:
    """Seconds per step over n back-to-back steps (after the caller's warm-up)."""
    t0 = time.perf_counter()
    m = None
    for _ in range(n):
      self.params, self.opt_state, m = self.compiled(self.params, self.opt_state, self.batch)
    jax.block_until_ready((self.params, m))
    self.loss = float(m["loss"])
    return (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------- profile

def profile(point: Point, label: str) -> str:
  """The trace of two steps: time per kernel class, the top kernels, and the optimized HLO of
  the slowest fusions (what each kernel name computes)."""
  point.run(1)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      point.run(2)
    return profile_summary(d, 2, label) + fusion_report(point.compiled.as_text(), d, 2, top=16)


# ----------------------------------------------------------------------------- driver


def use_featurizer(name: str) -> None:
  """Put the ``benchmarks/featurizer.py`` candidate ``name`` (a ``SHORT`` name) in place of
  ``ops.fir.featurize``, which the model calls through its module."""
  from benchmarks import featurizer as feat_bench
  from sh2_jax.ops import fir
  fir.featurize = feat_bench.VARIANTS[feat_bench.SHORT[name]]


def run(a) -> None:
  info = common.device_info()
  print(info, flush=True)
  budget = common.Budget(a.budget_s)
  devices = jax.device_count()
  mesh = None
  if a.cp > 1:
    if devices != a.cp:
      raise ValueError(f"--cp {a.cp} needs exactly {a.cp} devices; JAX sees {devices}")
    from sh2_jax.train.mesh import AXES
    mesh = jax.make_mesh((1, 1, a.cp), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rec = common.Recorder(a.out, "train_step" + (f"_cp{a.cp}" if a.cp > 1 else ""))
  rate = common.gemm_rate(512 if a.smoke else 8192)
  rec.add(kind="ceiling", gemm_flops=rate, **info)
  print(f"bf16 GEMM {rate / 1e12:.0f} TFLOP/s per device", flush=True)
  from sh2_jax.flops import flops_per_token
  li = li_impl_choice(a.li_impl)
  if a.featurizer:
    use_featurizer(a.featurizer)
  base = dict(dtype="bfloat16", param_dtype="float32", li_impl=li)
  if a.smoke:
    base.update(conv_impl="xla", attention_impl="xla")
  sh2 = evo2_7b_layout(a.width, a.layers, **base)
  models = [("SH2 (Evo 2 7B layout)", sh2), ("Transformer (all MHA)", transformer_like(sh2))]
  models = [m for m, key in zip(models, ("sh2", "transformer")) if key in a.models.split(",")]
  lengths = [int(x) for x in a.lengths.split(",")]
  est = {}  # model -> (compile_s, step_s at length)
  profiles = []
  for length in lengths:
    for label, cfg in models:
      row = dict(kind="step", model=label, L=length, width=a.width, layers=a.layers, cp=a.cp,
                 remat=a.remat, li_impl=li_impl_used(li, length), step_s=None, note="",
                 **({"featurizer": a.featurizer} if a.featurizer else {}))
      if label in est:  # predicted cost: compile + ~3 steps, attention-heavy steps ~ L^2
        c_s, s_s, l0 = est[label]
        power = 2.0 if label.startswith("Transformer") else 1.3
        predicted = c_s + 3 * s_s * (length / l0) ** power + 10
        if not budget.allows(predicted):
          row["note"] = f"not run: time budget (predicted {predicted:.0f} s, left {budget.left():.0f} s)"
          rec.add(**row)
          print(label, length, row["note"], flush=True)
          continue
      t0 = time.perf_counter()
      try:
        skip, memory = (), {}
        while True:  # a setting whose first step runs out of memory gives way to the next
          p = Point(cfg, length, a.remat, mesh, skip=skip)
          memory.update(p.memory)
          try:
            p.run(1)  # warm-up
            break
          except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
            if a.remat != "auto" or not common.is_oom(e):
              raise
            print(f"{label} L={length}: remat={p.remat} ran out of memory; next", flush=True)
            skip += (p.remat,)
            del p
        remat = p.remat
        row.update(remat=remat, memory_gib={k: round(v / 2**30, 2) for k, v in memory.items()},
                   oom=list(skip))
        est_step = p.run(1)
        n = int(np.clip(a.target_s / est_step, 1, 10))  # long steps: one more, mean of two
        step_s = p.run(n) if n > 1 else (est_step + p.run(1)) / 2
        fpt = flops_per_token(cfg, length)
        tps = length / step_s
        row.update(step_s=step_s, tokens_per_s=tps, mfu=tps * fpt / (rate * devices),
                   flops_per_token=fpt, params=p.num_params, compile_s=round(p.compile_s, 1),
                   steps=n, loss=p.loss, heldout_loss=p.heldout_loss())
        est[label] = (p.compile_s, step_s, length)
        if length == a.profile_len and budget.allows(6 * step_s + 20):
          prof = profile(p, f"{label}, L={length}, width {a.width}, {a.layers} layers")
          print(prof, flush=True)
          profiles.append(prof)
        del p
      except Exception as e:
        row["note"] = common.short_error(e, 300)
      row["wall_s"] = round(time.perf_counter() - t0, 1)
      rec.add(**row)
      if row["step_s"]:
        print(f"{label:24s} L={length:6d} remat={remat:6s} step {row['step_s'] * 1e3:9.1f} ms  "
              f"{row['tokens_per_s']:9.0f} tok/s  MFU {100 * row['mfu']:5.1f}%  compile "
              f"{row['compile_s']} s  wall {row['wall_s']} s  loss {row['loss']:.3f} "
              f"held-out {row['heldout_loss']:.3f}", flush=True)
      else:
        print(f"{label:24s} L={length:6d}: {row['note']}", flush=True)
  if a.out and profiles:
    with open(os.path.join(a.out, "profile" + (f"_cp{a.cp}" if a.cp > 1 else "") + ".md"),
              "w") as fh:
      fh.write("\n\n".join(profiles) + "\n")
  report(rec.rows, a.out, a.cp)


def report(rows: list[dict], out_dir: str, cp: int = 1) -> str:
  ceil = next((r for r in rows if r["kind"] == "ceiling"), {})
  steps = [r for r in rows if r.get("kind") == "step"]
  if not steps:
    return ""
  r0 = steps[0]
  head = (f"Card: {ceil.get('count')} x {ceil.get('device')}; {ceil.get('date')}; JAX "
          f"{ceil.get('jax')}; bf16 GEMM {ceil.get('gemm_flops', 0) / 1e12:.0f} TFLOP/s per "
          f"device (measured, the MFU denominator). Width {r0['width']}, {r0['layers']} layers, "
          f"batch 1, LI {', '.join(sorted({r['li_impl'] for r in steps}))}"
          + (f", context parallel over {cp} GPUs with FSDP over the same ranks" if cp > 1 else "")
          + ".")
  table = []
  for length in sorted({r["L"] for r in steps}):
    pair = {r["model"].split()[0]: r for r in steps if r["L"] == length}
    cells = [f"{length // 1024}K" if length >= 1024 else str(length)]
    for key in ("SH2", "Transformer"):
      r = pair.get(key)
      if r and r.get("step_s"):
        cells += [f"{r['step_s'] * 1e3:.0f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%",
                  r["remat"]]
      else:
        cells += [r["note"] if r else "–", "", "", ""]
    s, t = pair.get("SH2", {}), pair.get("Transformer", {})
    cells.append(f"{t['step_s'] / s['step_s']:.2f}x" if s.get("step_s") and t.get("step_s")
                 else "–")
    table.append(cells)
  text = head + "\n\n" + common.markdown_table(
      ["L", "SH2 ms/step", "SH2 tok/s", "SH2 MFU", "SH2 remat", "Transformer ms/step",
       "Transformer tok/s", "Transformer MFU", "Transformer remat", "SH2 speed-up"], table)
  if out_dir:
    name = "train_step" + (f"_cp{cp}" if cp > 1 else "")
    with open(os.path.join(out_dir, name + ".md"), "w") as fh:
      fh.write(text + "\n")
    try:
      plot(steps, os.path.join(out_dir, name + ".png"), head)
    except Exception as e:
      print("plot failed:", common.short_error(e), flush=True)
  print(text, flush=True)
  return text


def plot(steps: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  lengths = sorted({r["L"] for r in steps})
  sp, mfu = [], {}
  for length in lengths:
    pair = {r["model"].split()[0]: r for r in steps if r["L"] == length and r.get("step_s")}
    if len(pair) == 2:
      sp.append((length, pair["Transformer"]["step_s"] / pair["SH2"]["step_s"]))
    for k, r in pair.items():
      mfu.setdefault(k, []).append((length, 100 * r["mfu"]))
  if sp:
    axes[0].semilogx([p[0] for p in sp], [p[1] for p in sp], "o-", base=2)
    for x, y in sp:
      axes[0].annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6),
                       ha="center", fontsize=8)
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[0].set_title("SH2 (Evo 2 7B layout) / Transformer step throughput")
  axes[0].set_xlabel("sequence length L (batch 1)")
  axes[0].set_ylabel("speed-up")
  for k, pts in mfu.items():
    axes[1].semilogx([p[0] for p in pts], [p[1] for p in pts], "o-", label=k, base=2)
  axes[1].set_title("MFU vs measured bf16 GEMM rate")
  axes[1].set_xlabel("sequence length L")
  axes[1].set_ylabel("%")
  axes[1].legend(fontsize=8)
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  fig.suptitle(title[:150] + ("..." if len(title) > 150 else ""), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--smoke", action="store_true", help="tiny model on CPU (plumbing check)")
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (FSDP over them too)")
  p.add_argument("--lengths", default="32768,131072,8192,16384,65536",
                 help="comma list, in priority order")
  p.add_argument("--models", default="sh2,transformer", help="which of sh2,transformer to run")
  p.add_argument("--remat", default="auto", choices=["auto", *REMAT_ORDER],
                 help="auto: the fastest setting whose compiled step fits the device")
  p.add_argument("--li_impl", default="best", help="'best' = the FFT-free LI if available")
  p.add_argument("--budget_s", type=float, default=230.0)
  p.add_argument("--target_s", type=float, default=3.0, help="timed seconds per point")
  p.add_argument("--profile_len", type=int, default=32768)
  p.add_argument("--featurizer", default="", help="a candidate of benchmarks/featurizer.py "
                 "(its SHORT names) in place of ops.fir.featurize; default: the model's own")
  p.add_argument("--plot", default="", help="redraw table + plot from a train_step*.jsonl")
  p.add_argument("--mem_fraction", type=float, default=float(os.environ.get(
      "XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)), help="of the card for the allocator")
  a = p.parse_args()
  if a.featurizer:
    from benchmarks import featurizer as feat_bench
    if a.featurizer not in feat_bench.SHORT:
      p.error(f"--featurizer {a.featurizer!r} is not one of {sorted(feat_bench.SHORT)}")
  if not 0.1 <= a.mem_fraction <= 0.98:
    p.error(f"--mem_fraction {a.mem_fraction} is outside 0.1..0.98")
  os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(a.mem_fraction)  # before the backend starts
  if a.plot:
    with open(a.plot) as fh:
      rows = [json.loads(line) for line in fh if line.strip()]
    cp = re.search(r"_cp(\d+)", os.path.basename(a.plot))
    report(rows, a.out or os.path.dirname(a.plot), int(cp.group(1)) if cp else 1)
  else:
    if a.smoke:
      jax.config.update("jax_platforms", "cpu")
      # (XLA's CPU deadlock on this model: worked around in sh2_jax/__init__.py.)
      # 4 layers: one of each kind (SE, MR, LI, MHA). One measured length; the second, 4096x
      # longer, is predicted from the first far over any smoke budget: its rows are the time
      # budget's notes (the prediction, the skip, the table's note cells), never a run.
      a.width, a.layers, a.lengths, a.profile_len = 128, 4, f"256,{1 << 20}", 256
      a.target_s = 0.5
    run(a)
