"""Mixer cores and mixer layers of StripedHyena 2 against their peers, one process, one card.

Width D = 4096, batch 1, bf16 activations; forward and forward+backward medians (``common.timeit``)
at L in {2K ... 128K}.

Cores — what sits between the input and output projections:
  SE           gated 7-tap grouped FIR (256 groups), Pallas two-stage kernel (``dispatch.gated_fir``)
  MR           gated 128-tap grouped FIR + skip, the same kernels
  SE/MR mgpu   the same cores through the Mosaic GPU kernels (``conv_impl='pallas_mgpu'``,
               ``sh2_jax.kernels.fir_conv_mgpu``), timed beside the Triton ones in the same run
  LI fft       gated modal long filter (16 poles/channel), float32 FFT of size 2L
  LI scan      the same through the FFT-free chunked modal recurrence (``sh2_jax.kernels.modal_scan``)
  LI fast      the same through the fast token-serial kernels (``sh2_jax.kernels.modal_fast``,
               ``li_impl='modal_fast'``)
  MHA          causal softmax attention, 32 heads x 128, ``jax.nn.dot_product_attention`` (cuDNN)
  Mamba-2      SSD scan (64 heads x 64, state 128, one B/C group, D skip), jax-linear-attention's
               Mosaic GPU kernels (``jla.layers.ssm.mamba2_ssd``, grouped B/C gradients)
  GLA          gated linear attention (32 heads x 128, per-channel decay), jax-linear-attention's
               Mosaic GPU kernels
Layers — the same with their projections (x [1, L, D] -> [1, L, D], gradients for the input and
every parameter; float32 parameters, bf16 compute, as in training): our HyenaBlock.mix (in-proj
D->3D, featurizer, core, out-proj) and AttentionBlock.mix (Wqkv, RoPE, cuDNN, out_proj); the
peers' own layers from jax-linear-attention: ``Mamba2`` (state-spaces defaults: expand 2, heads
of 64, state 128, short conv 4, gated RMSNorm, fused glue) and ``GLA`` (32 heads x 128, low-rank
gate, short convs, gated output norm). Pre-norm and MLP are left out (identical across mixers).

  python benchmarks/operators.py --out DIR [--budget_s 200]   # GPU: tables, JSONL, PNG
  python benchmarks/operators.py --smoke                      # CPU plumbing check, tiny shapes
  python benchmarks/operators.py --plot DIR/operators.jsonl   # redraw the tables and plot
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from sh2_jax import dispatch  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

CORES = ["SE", "MR", "SE mgpu", "MR mgpu", "LI fft", "LI scan", "LI fast", "MHA", "Mamba-2",
         "GLA"]
LAYERS = ["SE", "MR", "SE mgpu", "MR mgpu", "LI fft", "LI scan", "LI fast", "MHA", "Mamba-2",
          "GLA"]


def _conv_impl(name: str, s: "Setup") -> tuple[str, bool]:
  """(conv_impl, interpret) of an SE/MR entry: ``... mgpu`` is the Mosaic GPU kernel family (in
  its interpret mode off GPU: --smoke), the plain names the run's default."""
  if name.endswith("mgpu"):
    return "pallas_mgpu", not s.gpu
  return s.conv_impl, False


def _have_jla() -> bool:
  try:
    import jla.ops  # noqa: F401
    return True
  except ImportError:
    return False


def _have_modal_scan() -> bool:
  try:
    from sh2_jax.kernels import modal_scan  # noqa: F401
    return True
  except ImportError:
    return False


def _li_dispatch_name() -> str | None:
  """The ``li_impl`` value of the FFT-free LI path, if the model's dispatch offers one."""
  from sh2_jax.config import LI_IMPLS
  return "modal_scan" if "modal_scan" in LI_IMPLS else None


class Setup:
  """Shapes and implementation choices of one run (full size on GPU, tiny for --smoke)."""

  def __init__(self, smoke: bool):
    self.smoke = smoke
    self.gpu = jax.default_backend() == "gpu"
    self.d = 256 if smoke else 4096
    self.groups = 16 if smoke else 256
    self.heads = self.d // 128
    self.ssd_heads = self.d // 64
    self.conv_impl = "pallas" if self.gpu else "xla"
    self.attn_impl = "cudnn" if self.gpu else "xla"
    self.la_impl = "mosaic_gpu" if self.gpu else "chunked"
    self.timing = dict(samples=3, target_s=0.0) if smoke else {}


def _rand(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _poles(key, d, n=16):
  rates = jnp.logspace(-4, 0, n)
  lam = -jnp.tile(rates, (d, 1))
  res = jax.random.normal(key, (d, n), jnp.float32) * jnp.sqrt(2 * rates) / 4
  return lam, res


def make_core(name: str, length: int, s: Setup):
  """(f, args): f(*args) -> y; every arg is a float array and differentiable."""
  ks = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  d = s.d
  if name in ("SE", "MR", "SE mgpu", "MR mgpu", "LI fft", "LI scan", "LI fast"):
    x1, v, x2 = (_rand(k, (1, length, d), bf) for k in ks[:3])
    dskip = _rand(ks[4], (d,), jnp.float32)
    if name.split()[0] in ("SE", "MR"):
      taps = 7 if name.startswith("SE") else 128
      h = _rand(ks[3], (s.groups, taps), jnp.float32, 1 / math.sqrt(taps))
      impl, interpret = _conv_impl(name, s)
      if name.startswith("SE"):  # SE has no skip term
        return (lambda x1, v, x2, h: dispatch.gated_fir(x1, v, x2, h, None, impl, interpret),
                (x1, v, x2, h))
      return (lambda x1, v, x2, h, dk: dispatch.gated_fir(x1, v, x2, h, dk, impl, interpret),
              (x1, v, x2, h, dskip))
    lam, res = _poles(ks[3], d)
    if name == "LI fft":
      return (lambda x1, v, x2, lam, res, dk: dispatch.gated_modal(x1, v, x2, lam, res, dk, "fft"),
              (x1, v, x2, lam, res, dskip))
    kw = {} if s.gpu else {"interpret": True}
    if name == "LI fast":
      return (lambda x1, v, x2, lam, res, dk: dispatch.gated_modal(x1, v, x2, lam, res, dk,
                                                                   "modal_fast", **kw),
              (x1, v, x2, lam, res, dskip))
    from sh2_jax.kernels import modal_scan
    return (lambda x1, v, x2, lam, res, dk: modal_scan.gated_modal_scan(x1, v, x2, lam, res, dk,
                                                                        **kw),
            (x1, v, x2, lam, res, dskip))
  if name == "MHA":
    q, k, v = (_rand(kk, (1, length, s.heads, 128), bf) for kk in ks[:3])
    return (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=128 ** -0.5, is_causal=True, implementation=s.attn_impl), (q, k, v))
  if name == "Mamba-2":
    from jla.layers.ssm import mamba2_ssd
    h = s.ssd_heads
    x = _rand(ks[0], (1, length, h, 64), bf)
    dt = jax.nn.softplus(_rand(ks[1], (1, length, h), jnp.float32) - 4.0)  # ~0.02
    a = -jnp.exp(jax.random.uniform(ks[2], (h,), jnp.float32, 0.0, math.log(16.0)))
    b, c = (_rand(kk, (1, length, 1, 128), bf) for kk in ks[3:5])
    dd = jnp.ones((h,), jnp.float32)

    def ssd(x, dt, a, b, c, dd):
      return mamba2_ssd(x, dt, a, b, c, d=dd, impl=s.la_impl, grouped_key_grads=s.gpu)[0]
    return ssd, (x, dt, a, b, c, dd)
  if name == "GLA":
    from jla import ops
    q, k, v = (_rand(kk, (1, length, s.heads, 128), bf) for kk in ks[:3])
    g = jax.nn.log_sigmoid(_rand(ks[3], (1, length, s.heads, 128), jnp.float32) + 4.0) / 16.0

    def gla(q, k, v, g):
      return ops.linear_attention("gla", q, k, v, g=g, impl=s.la_impl)[0]
    return gla, (q, k, v, g)
  raise ValueError(f"unknown core {name!r}")


def make_layer(name: str, length: int, s: Setup):
  """(f, args) with args = (params pytree, x [1, L, D] bf16)."""
  x = _rand(jax.random.key(length + 1), (1, length, s.d), jnp.bfloat16)
  if name in ("SE", "MR", "SE mgpu", "MR mgpu", "LI fft", "LI scan", "LI fast", "MHA"):
    from flax import nnx
    from sh2_jax.config import ModelConfig
    from sh2_jax.blocks import make_block
    li_impl = "modal_fast" if name == "LI fast" else "fft"
    if name == "LI scan":
      li_impl = _li_dispatch_name()
      if li_impl is None:
        raise NotImplementedError("the model's dispatch has no FFT-free li_impl yet")
    op = name.split()[0]
    conv_impl, interpret = _conv_impl(name, s)
    if interpret:
      raise NotImplementedError("the Mosaic GPU layer runs only on a GPU (the model has no "
                                "interpret switch)")
    cfg = ModelConfig(d_model=s.d, num_layers=32, layout=op, num_heads=s.heads, mlp_hidden=128,
                      se_groups=s.groups, mr_groups=s.groups, dtype="bfloat16",
                      param_dtype="float32", conv_impl=conv_impl, li_impl=li_impl,
                      attention_impl=s.attn_impl)
    block = make_block(1, op, cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(block)

    def f(state, x):
      return nnx.merge(graphdef, state).mix(x)[0]
    return f, (state, x)
  import equinox as eqx
  key = jax.random.key(3)
  if name == "Mamba-2":
    from jla.layers.ssm import Mamba2
    from jla.models.config import SSMConfig
    layer = Mamba2(s.d, SSMConfig(implementation=s.la_impl), key=key, std=0.02, norm_eps=1e-5)
  elif name == "GLA":
    from jla.layers.linear_attention import GLA
    from jla.models.config import LinearAttentionConfig
    cfg = LinearAttentionConfig(num_k_heads=s.heads, num_v_heads=s.heads, head_k_dim=128,
                                head_v_dim=128, implementation=s.la_impl)
    layer = GLA(s.d, cfg, key=key, std=0.02, norm_eps=1e-5)
  else:
    raise ValueError(f"unknown layer {name!r}")
  params, static = eqx.partition(layer, eqx.is_inexact_array)

  def g(params, x):
    return eqx.combine(params, static)(x)
  return g, (params, x)


def fwd_and_fwdbwd(f):
  """Jitted ``f`` and ``(y, grads of every argument)`` for a random cotangent ``ct``."""
  def fb(args, ct):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(ct)
  return jax.jit(f), jax.jit(fb)


def measure(kind: str, name: str, length: int, s: Setup, rec: common.Recorder) -> dict:
  t_start = time.perf_counter()
  row = dict(kind=kind, op=name, L=length, d=s.d, fwd_s=None, fwdbwd_s=None, note="")
  try:
    f, args = (make_core if kind == "core" else make_layer)(name, length, s)
    fwd, fb = fwd_and_fwdbwd(f)
    out = jax.eval_shape(f, *args)
    ct = _rand(jax.random.key(99), out.shape, out.dtype)
    row["fwd_s"] = common.timeit(fwd, *args, **s.timing)
    row["fwdbwd_s"] = common.timeit(fb, args, ct, **s.timing)
  except NotImplementedError as e:
    row["note"] = str(e)
  except Exception as e:  # an OOM (or a peer kernel that declines a shape) is a table note
    row["note"] = common.short_error(e)
  row["wall_s"] = round(time.perf_counter() - t_start, 2)
  print(f"{kind:5s} {name:8s} L={length:6d}: fwd {common.fmt_ms(row['fwd_s']):>8s} ms  "
        f"fwd+bwd {common.fmt_ms(row['fwdbwd_s']):>8s} ms  ({row['wall_s']:.1f} s) {row['note']}",
        flush=True)
  return rec.add(**row)


def available(names, s: Setup) -> tuple[list[str], list[str]]:
  keep, notes = [], []
  for n in names:
    if n in ("Mamba-2", "GLA") and not _have_jla():
      notes.append(f"{n}: jax-linear-attention not installed")
    elif n == "LI scan" and not _have_modal_scan():
      notes.append("LI scan: sh2_jax.kernels.modal_scan missing")
    else:
      keep.append(n)
  return keep, notes


def run(args) -> None:
  s = Setup(args.smoke)
  lengths = [256] if args.smoke else [int(x) for x in args.lengths.split(",")]
  layer_lengths = lengths if args.smoke else [int(x) for x in args.layer_lengths.split(",")]
  budget = common.Budget(args.budget_s)
  info = common.device_info()
  print(info, flush=True)
  rec = common.Recorder(args.out, "operators")
  bw = common.copy_bandwidth(1 << 24 if args.smoke else 1 << 30)
  rate = common.gemm_rate(512 if args.smoke else 8192)
  rec.add(kind="ceiling", copy_Bps=bw, gemm_flops=rate, **info)
  print(f"copy {bw / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} TFLOP/s", flush=True)
  cores, notes = available([n for n in args.cores.split(",") if n], s)
  layers, lnotes = available([n for n in args.layers.split(",") if n], s)  # "": no layers
  for n in notes + lnotes:
    print("skip:", n, flush=True)
  core_share = args.core_share
  for length in lengths:  # cores: every op at one L before the next L
    for name in cores:
      if budget.left() < args.budget_s * (1 - core_share):
        rec.add(kind="core", op=name, L=length, d=s.d, fwd_s=None, fwdbwd_s=None,
                note="not run: time budget")
        continue
      measure("core", name, length, s, rec)
  for length in layer_lengths:
    for name in layers:
      if budget.left() < 10:
        rec.add(kind="layer", op=name, L=length, d=s.d, fwd_s=None, fwdbwd_s=None,
                note="not run: time budget")
        continue
      measure("layer", name, length, s, rec)
  report(rec.rows, args.out, info)


# ----------------------------------------------------------------------------- tables and plot


def report(rows: list[dict], out_dir: str, info: dict | None = None) -> str:
  ceil = next((r for r in rows if r["kind"] == "ceiling"), {})
  info = info or {k: ceil.get(k) for k in ("device", "date", "jax")}
  parts = [f"Card: {info.get('device')}; {info.get('date')}; JAX {info.get('jax')}. Ceilings "
           f"measured on the card: elementwise copy {ceil.get('copy_Bps', 0) / 1e12:.2f} "
           f"TB/s (read + write), bf16 GEMM 8192^3 {ceil.get('gemm_flops', 0) / 1e12:.0f} TFLOP/s."]
  bw = ceil.get("copy_Bps") or 1.0
  for kind, title in (("core", "Mixer cores"), ("layer", "Mixer layers (with projections)")):
    sel = [r for r in rows if r.get("kind") == kind]
    if not sel:
      continue
    ops = list(dict.fromkeys(r["op"] for r in sel))
    lengths = sorted({r["L"] for r in sel})
    d = sel[0]["d"]
    table = []
    for length in lengths:
      cells = [f"{length // 1024}K" if length >= 1024 else str(length)]
      for op in ops:
        r = next((r for r in sel if r["op"] == op and r["L"] == length), None)
        if r is None or r["fwd_s"] is None:
          cells.append(r["note"] if r else "–")
        else:
          cells.append(f"{common.fmt_ms(r['fwd_s'])} / {common.fmt_ms(r['fwdbwd_s'])}")
      table.append(cells)
    parts.append(f"**{title}**, D = {d}, B = 1, bf16; median ms, forward / forward+backward:\n\n"
                 + common.markdown_table(["L"] + ops, table))
    if kind == "core" and {"SE", "MR", "Mamba-2"} <= set(ops):
      sp = []
      for length in lengths:
        get = {op: next((r for r in sel if r["op"] == op and r["L"] == length), {}) for op in ops}
        cells = [f"{length // 1024}K" if length >= 1024 else str(length)]
        for op in ("SE", "MR", "LI scan", "LI fast", "LI fft"):
          a, m = get.get(op, {}), get["Mamba-2"]
          if a.get("fwd_s") and m.get("fwd_s"):
            cells.append(f"{m['fwd_s'] / a['fwd_s']:.2f}x / {m['fwdbwd_s'] / a['fwdbwd_s']:.2f}x")
          else:
            cells.append("–")
        for op in ("SE", "MR"):  # memory floor: read x1, v, x2, write y (fwd)
          a = get.get(op, {})
          floor = 4 * length * d * 2 / bw
          cells.append(f"{100 * floor / a['fwd_s']:.0f}%" if a.get("fwd_s") else "–")
        sp.append(cells)
      parts.append("Speed-up of our cores over the Mamba-2 SSD core (its time / ours; fwd / "
                   "fwd+bwd), and the share of the memory floor (4·L·D·2 bytes at the copy "
                   "bandwidth) the SE and MR forward reach:\n\n" + common.markdown_table(
                       ["L", "SE vs Mamba-2", "MR vs Mamba-2", "LI scan vs Mamba-2",
                        "LI fast vs Mamba-2", "LI fft vs Mamba-2", "SE fwd % floor",
                        "MR fwd % floor"], sp))
    if kind == "core" and {"SE mgpu", "MR mgpu"} & set(ops):
      parts.append(_mgpu_table(sel, lengths, d, bw))
  sources = sorted({f"{r['op']}: {r['source']}" if r.get("kind") != "ceiling" else r["source"]
                    for r in rows if r.get("source")})
  if sources:  # rows collected from earlier runs: say where each came from
    parts.append("Collected from earlier runs, not one process (ratios are cross-run):\n\n"
                 + "\n".join(f"- {x}" for x in sources))
  text = "\n\n".join(parts)
  if out_dir:
    with open(os.path.join(out_dir, "operators.md"), "w") as fh:
      fh.write(text + "\n")
    try:
      plot(rows, os.path.join(out_dir, "operators.png"))
    except Exception as e:  # the plot must never cost the tables
      print("plot failed:", common.short_error(e), flush=True)
  print(text, flush=True)
  return text


def _mgpu_table(sel: list[dict], lengths: list[int], d: int, bw: float) -> str:
  """Mosaic GPU against Triton for the SE and MR cores, same run: the Triton time over the
  Mosaic GPU time (> 1: Mosaic GPU faster) and each forward's share of the memory floor."""
  rows = []
  for length in lengths:
    get = lambda op: next((r for r in sel if r["op"] == op and r["L"] == length), {})
    cells = [f"{length // 1024}K" if length >= 1024 else str(length)]
    floor = 4 * length * d * 2 / bw
    for op in ("SE", "MR"):
      tri, mg = get(op), get(f"{op} mgpu")
      for key in ("fwd_s", "fwdbwd_s"):
        cells.append(f"{tri[key] / mg[key]:.2f}x" if tri.get(key) and mg.get(key) else "–")
      cells.append(f"{100 * floor / mg['fwd_s']:.0f}%" if mg.get("fwd_s") else "–")
    rows.append(cells)
  return ("Mosaic GPU (`pallas_mgpu`) against Triton (`pallas`) kernels, same run: Triton time "
          "/ Mosaic GPU time (> 1: Mosaic GPU faster), and the Mosaic GPU forward's share of "
          "the memory floor:\n\n" + common.markdown_table(
              ["L", "SE fwd", "SE fwd+bwd", "SE mgpu fwd % floor", "MR fwd", "MR fwd+bwd",
               "MR mgpu fwd % floor"], rows))


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kinds = [(k, t) for k, t in (("core", "mixer core"), ("layer", "mixer layer"))
           if any(r.get("kind") == k and r.get("fwd_s") for r in rows)]
  fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.25 * len(kinds)), squeeze=False)
  for i, (kind, title) in enumerate(kinds):
    sel = [r for r in rows if r.get("kind") == kind and r.get("fwd_s")]
    for j, (key, phase) in enumerate((("fwd_s", "forward"), ("fwdbwd_s", "forward + backward"))):
      ax = axes[i, j]
      for op in dict.fromkeys(r["op"] for r in sel):
        pts = sorted((r["L"], r[key]) for r in sel if r["op"] == op)
        style = "o-" if op.split()[0] in ("SE", "MR", "LI") else "s--"
        ax.loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], style, label=op, base=2)
      ax.set_xlabel("sequence length L (D = 4096, B = 1, bf16)")
      ax.set_ylabel("ms (median)")
      ax.set_title(f"{title}, {phase}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (plumbing check)")
  p.add_argument("--budget_s", type=float, default=210.0)
  p.add_argument("--core_share", type=float, default=0.6,
                 help="fraction of the budget the cores may use before the layers start")
  p.add_argument("--lengths", default="16384,65536,2048,131072,8192,32768,4096",
                 help="comma list in priority order (the budget cuts the tail)")
  p.add_argument("--layer_lengths", default="16384,131072,2048,65536,8192,32768,4096")
  p.add_argument("--cores", default=",".join(CORES))
  p.add_argument("--layers", default=",".join(LAYERS))
  p.add_argument("--plot", default="", help="redraw tables + plot from an operators.jsonl")
  a = p.parse_args()
  if a.plot:
    with open(a.plot) as fh:
      rows = [json.loads(line) for line in fh if line.strip()]
    report(rows, a.out or os.path.dirname(a.plot))
  else:
    if a.smoke:  # the modal-scan kernel in the Pallas interpreter and the Mosaic GPU FIR in its
      # interpret mode (~25 s per core at the smoke shape) are too slow for a smoke run; name
      # them in --cores to include them anyway
      jax.config.update("jax_platforms", "cpu")
      slow = ("LI scan", "LI fast", "SE mgpu", "MR mgpu")
      if a.cores == ",".join(CORES):
        a.cores = ",".join(n for n in CORES if n not in slow)
      if a.layers == ",".join(LAYERS):
        a.layers = ",".join(n for n in LAYERS if n not in slow)
    run(a)
