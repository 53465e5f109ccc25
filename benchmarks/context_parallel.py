"""Context parallelism on N GPUs against one: per-operator and full-model fwd+bwd step time.

  python benchmarks/context_parallel.py --out DIR            # on a host with N >= 2 GPUs
  python benchmarks/context_parallel.py --plot DIR/context_parallel.jsonl --png FILE.png

One process measures both: the unsharded operator / model on device 0 (the 1-GPU baseline), then
the same computation on a ``context`` mesh of all N devices (zig-zag, sh2_jax/parallel), for
every mode (MR p2p | a2a, LI a2a | p2p_fft | state, MHA allgather | ring). Each point is
``jax.value_and_grad`` of a scalar of the output (inputs and filter gradients), bf16, B = 1,
width 4096 (7B shapes: 256 filter groups, 32 heads of 128). Each CP point is also checked against
the baseline (relative error of the input gradient). Scaling efficiency = t_1 / (N t_N).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.common import (Budget, Recorder, device_info, fmt_ms, markdown_table,  # noqa: E402
                               short_error, timeit)

AX = "context"


def op_cases(d: int):
  """name -> (inputs maker, baseline fn(params, *xs), {mode: local CP fn(params, *xs, n)})."""
  from sh2_jax import dispatch
  from sh2_jax.parallel import a2a, halo, li_state_passing, p2p_fft
  from sh2_jax.parallel.attention import cp_attention
  groups = 256
  key = jax.random.key(0)
  fir_auto, li_auto, li_fft = (dispatch.fir_fn("auto"), dispatch.modal_fn("auto"),
                               dispatch.modal_fn("fft"))
  attend = dispatch.attention_fn("auto", jnp.bfloat16)

  def hyena_inputs(length, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 3)
    return [jax.random.normal(k, (1, length, d), dtype) for k in ks]

  def fir_params(taps):
    return (jax.random.normal(key, (groups, taps)) / np.sqrt(taps), jnp.ones((d,)))

  lam = -jnp.exp(jnp.tile(jnp.log(jnp.logspace(-4, 0, 16)), (d, 1)))
  li_params = (lam, jax.random.normal(key, (d, 16)) * 0.05, jnp.ones((d,)))
  cases = {
      "SE": (hyena_inputs, fir_params(7),
             lambda p, a, b, c: dispatch.gated_fir(a, b, c, p[0], None, "auto"),
             {"p2p": lambda p, a, b, c, n: halo.halo_gated_fir(a, b, c, p[0], None, fir_auto, AX, n)}),
      "MR": (hyena_inputs, fir_params(128),
             lambda p, a, b, c: dispatch.gated_fir(a, b, c, p[0], p[1], "auto"),
             {"p2p": lambda p, a, b, c, n: halo.halo_gated_fir(a, b, c, p[0], p[1], fir_auto, AX, n),
              "a2a": lambda p, a, b, c, n: a2a.a2a_gated_fir(a, b, c, p[0], p[1], fir_auto, AX, n)}),
      "LI": (hyena_inputs, li_params,
             lambda p, a, b, c: dispatch.gated_modal(a, b, c, p[0], p[1], p[2], "auto"),
             {"a2a": lambda p, a, b, c, n: a2a.a2a_gated_modal(a, b, c, p[0], p[1], p[2], li_auto,
                                                               AX, n),
              "a2a_fft": lambda p, a, b, c, n: a2a.a2a_gated_modal(a, b, c, p[0], p[1], p[2],
                                                                   li_fft, AX, n),
              "p2p_fft": lambda p, a, b, c, n: p2p_fft.p2p_gated_modal(a, b, c, p[0], p[1], p[2],
                                                                       AX, n),
              "state": lambda p, a, b, c, n: li_state_passing.state_passing_gated_modal(
                  a, b, c, p[0], p[1], p[2], AX, n, dispatch.modal_with_state_fn("auto"))}),
  }

  def mha_inputs(length):
    ks = jax.random.split(key, 3)
    return [jax.random.normal(k, (1, length, d // 128, 128), jnp.bfloat16) for k in ks]

  att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                     implementation="cudnn")
  cases["MHA"] = (mha_inputs, jnp.zeros(()), lambda p, a, b, c: att(a, b, c),
                  {m: (lambda p, a, b, c, n, m=m: cp_attention(a, b, c, AX, n, 128 ** -0.5,
                                                               attend, m))
                   for m in ("allgather", "ring")})
  return cases


def grad_step(fn):
  """value_and_grad of sum(fn(params, *xs)) with respect to params and inputs."""
  def loss(params, xs):
    return jnp.sum(fn(params, *xs).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def rel_err(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def context_mesh(n: int):
  return jax.make_mesh((n,), (AX,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def bench_ops(rec, lengths, ops, d, ranks, budget, skip_modes=()):
  """Per operator and length: the 1-GPU baseline once, then every mode on each mesh size."""
  from sh2_jax import dispatch
  from sh2_jax.parallel.zigzag import zigzag_permutation, zigzag_unshard
  dev0 = jax.devices()[0]
  cases = op_cases(d)
  for length in lengths:
    for op in ops:
      make, params, base_fn, modes = cases[op]
      modes = {m: f for m, f in modes.items() if m not in skip_modes}
      if budget.left() < 25:
        print(f"budget: skipping {op} at L={length}", flush=True)
        continue
      xs = [jax.device_put(x, dev0) for x in make(length)]
      p0 = jax.device_put(params, dev0)
      t1, g1, err1 = None, None, ""
      if op == "MHA" and length > 262144:
        err1 = "not run: quadratic (one 1-GPU step at 512K costs ~15 s)"
      else:
        try:
          step = grad_step(base_fn)
          t1 = timeit(step, p0, xs, max_s=1.0)
          g1 = step(p0, xs)[1][1][0]  # d/dx1
        except Exception as e:  # noqa: BLE001 - OOM at long L is a result, not a crash
          err1 = short_error(e)
      rec.add(kind="op", op=op, mode="1gpu", length=length, n=1, t=t1, note=err1)
      print(f"{op:4s} L={length:7d} 1 GPU   {fmt_ms(t1):>8s} ms {err1}", flush=True)
      if op == "LI" and "a2a_fft" not in skip_modes:  # the FFT path on one GPU too
        try:
          t_fft = timeit(grad_step(lambda p, a, b, c: dispatch.gated_modal(
              a, b, c, p[0], p[1], p[2], "fft")), p0, xs, max_s=1.0)
          rec.add(kind="op", op=op, mode="1gpu_fft", length=length, n=1, t=t_fft, note="")
        except Exception as e:  # noqa: BLE001
          rec.add(kind="op", op=op, mode="1gpu_fft", length=length, n=1, t=None,
                  note=short_error(e))
        print(f"LI   L={length:7d} 1 GPU fft {fmt_ms(rec.rows[-1]['t'])} ms", flush=True)
      host = [np.asarray(x) for x in xs]
      del xs
      for n in ranks:
        mesh = context_mesh(n)
        spec = NamedSharding(mesh, P(None, AX))
        perm = zigzag_permutation(length, n)  # on the host: no full-length copy on GPU 0
        zs = [jax.device_put(np.take(x, perm, axis=1), spec) for x in host]
        pr = jax.device_put(params, NamedSharding(mesh, P()))
        for mode, cp_fn in modes.items():
          if budget.left() < 15:
            break
          f = jax.shard_map(lambda p, *a, cp_fn=cp_fn, n=n: cp_fn(p, *a, n), mesh=mesh,
                            in_specs=(P(),) + (P(None, AX),) * 3, out_specs=P(None, AX),
                            check_vma=False)
          tn, err, note = None, None, ""
          try:
            step = grad_step(f)
            tn = timeit(step, pr, zs, max_s=1.0)
            if g1 is not None:
              gz = step(pr, zs)[1][1][0]
              err = rel_err(jax.device_put(zigzag_unshard(jax.device_put(gz, dev0), n), dev0),
                            g1)
          except Exception as e:  # noqa: BLE001
            note = short_error(e)
          eff = t1 / (n * tn) if (t1 and tn) else None
          rec.add(kind="op", op=op, mode=mode, length=length, n=n, t=tn, t1=t1, efficiency=eff,
                  grad_rel_err=err, note=note)
          print(f"{op:4s} L={length:7d} {n} GPUs {mode:9s} {fmt_ms(tn):>8s} ms  eff "
                f"{'-' if eff is None else f'{eff:.2f}'}  err {err} {note}", flush=True)
        del zs
      del g1


def bench_model(rec, length, d, layers, ranks, budget, modes):
  import optax
  from flax import nnx
  from sh2_jax.config import ModelConfig
  from sh2_jax.model import StripedHyena
  from sh2_jax.parallel.context import ContextParallel, context_parallel_logits
  from sh2_jax.parallel.zigzag import zigzag_shard
  from sh2_jax.train.step import forward
  cfg = ModelConfig(d_model=d, num_layers=len(layers.split("-")), layout=layers,
                    num_heads=d // 128, mlp_hidden=11008 if d == 4096 else 8 * d // 3,
                    se_groups=256, mr_groups=256, dtype="bfloat16", param_dtype="float32",
                    max_seqlen=length)
  dev0 = jax.devices()[0]
  with jax.default_device(dev0):
    model = StripedHyena(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(1), (1, length), 0, 256)
  targets = jnp.roll(tokens, -1, axis=1)

  def step_1gpu(st, tok, tgt):
    logits = forward(nnx.merge(graphdef, st), tok, remat="blocks")
    return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

  t1, loss1 = None, None
  try:
    fn = jax.jit(jax.value_and_grad(step_1gpu))
    args = jax.device_put((state, tokens, targets), dev0)
    t1 = timeit(fn, *args, max_s=3.0, samples=3)
    loss1 = float(fn(*args)[0])
    note = ""
  except Exception as e:  # noqa: BLE001
    note = short_error(e)
  rec.add(kind="model", mode="1gpu", length=length, n=1, t=t1, loss=loss1, note=note,
          layers=layers)
  print(f"model {layers} L={length} 1 GPU {fmt_ms(t1)} ms loss {loss1} {note}", flush=True)
  for n, mode in [(n, m) for n in ranks for m in modes]:
    if budget.left() < 30:
      break
    mesh = context_mesh(n)
    state_r = jax.device_put(state, NamedSharding(mesh, P()))
    tok_r = jax.device_put(tokens, NamedSharding(mesh, P()))
    tgt_z = jax.device_put(zigzag_shard(targets, n), NamedSharding(mesh, P(None, AX)))
    mr, li, att = mode.split("/")
    cp = ContextParallel(size=n, mr_mode=mr, li_mode=li, attention_mode=att, remat=True)

    def step_cp(st, tok, tgt_zigzag, cp=cp, mesh=mesh):
      logits = context_parallel_logits(nnx.merge(graphdef, st), tok, mesh, cp,
                                       zigzag_output=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tgt_zigzag).mean()

    tn, loss_n, note = None, None, ""
    try:
      fn = jax.jit(jax.value_and_grad(step_cp))
      tn = timeit(fn, state_r, tok_r, tgt_z, max_s=3.0, samples=3)
      loss_n = float(fn(state_r, tok_r, tgt_z)[0])
    except Exception as e:  # noqa: BLE001
      note = short_error(e)
    eff = t1 / (n * tn) if (t1 and tn) else None
    rec.add(kind="model", mode=mode, length=length, n=n, t=tn, t1=t1, efficiency=eff,
            loss=loss_n, loss_1gpu=loss1, note=note, layers=layers)
    print(f"model {layers} L={length} {n} GPUs {mode} {fmt_ms(tn)} ms eff {eff} loss {loss_n} "
          f"{note}", flush=True)


def table(rows):
  out = []
  for r in rows:
    if r["n"] == 1:
      if r["mode"] == "1gpu_fft":
        out.append([r["op"], "1 GPU, li_impl fft", r["length"], 1, fmt_ms(r["t"]), "", "", "",
                    r.get("note", "")])
      continue
    eff = r.get("efficiency")
    err = r.get("grad_rel_err")
    extra = (f"{err:.1e}" if err is not None else
             (f"loss {r['loss']:.4f} vs {r['loss_1gpu']:.4f}" if r.get("loss") is not None
              and r.get("loss_1gpu") is not None else ""))
    out.append([r.get("op", "model " + r.get("layers", "")), r["mode"], r["length"], r["n"],
                fmt_ms(r.get("t1")), fmt_ms(r.get("t")), "-" if eff is None else f"{eff:.2f}",
                extra, r.get("note", "")])
  return markdown_table(["what", "mode", "L", "GPUs", "1 GPU ms", "N GPUs ms", "efficiency",
                         "check", "note"], out)


def plot(jsonl: str, png: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(line) for line in open(jsonl)]
  cp = [r for r in rows if r.get("n", 1) > 1 and r.get("t") and r.get("t1")]
  labels = [f"{r.get('op', 'model')} {r['mode']}\nL={r['length'] // 1024}K, {r['n']} GPUs"
            for r in cp]
  fig, ax = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(cp)), 4.5))
  x = np.arange(len(cp))
  ax[0].bar(x - 0.2, [r["t1"] * 1e3 for r in cp], 0.4, label="1 GPU")
  ax[0].bar(x + 0.2, [r["t"] * 1e3 for r in cp], 0.4, label="N GPUs (CP)")
  ax[0].set_yscale("log")
  ax[0].set_ylabel("fwd+bwd ms")
  ax[1].bar(x, [r["efficiency"] for r in cp])
  ax[1].axhline(1.0, color="k", lw=0.8)
  ax[1].set_ylabel("scaling efficiency t1 / (N tN)")
  for a in ax:
    a.set_xticks(x, labels, rotation=90, fontsize=7)
  ax[0].legend()
  fig.tight_layout()
  fig.savefig(png, dpi=120)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--lengths", default="131072,524288")
  ap.add_argument("--ops", default="MR,LI,SE,MHA")
  ap.add_argument("--width", type=int, default=4096)
  ap.add_argument("--model_length", type=int, default=131072)
  ap.add_argument("--layers", default="SE-MR-LI-MHA")
  ap.add_argument("--model_modes", default="p2p/state/allgather,a2a/a2a/ring")
  ap.add_argument("--budget", type=float, default=200.0)
  ap.add_argument("--ranks", default="", help="mesh sizes, e.g. 2,4 (default: all devices)")
  ap.add_argument("--skip_modes", default="", help="e.g. a2a_fft,p2p_fft (a2a_fft also skips "
                  "the 1-GPU FFT baseline of LI)")
  ap.add_argument("--plot", default="")
  ap.add_argument("--png", default="")
  args = ap.parse_args()
  if args.plot:
    plot(args.plot, args.png)
    return
  budget = Budget(args.budget)
  n = jax.device_count()
  ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [n]
  if n < 2 or any(r < 2 or r > n for r in ranks):
    raise SystemExit(f"--ranks {ranks}: each mesh needs 2..{n} devices (JAX sees {n})")
  skip = tuple(m for m in args.skip_modes.split(",") if m)
  info = device_info()
  print(json.dumps(info), flush=True)
  rec = Recorder(args.out, "context_parallel")
  lengths = [int(x) for x in args.lengths.split(",")]
  ops = args.ops.split(",")
  hyena_ops = [o for o in ops if o != "MHA"]
  # most wanted first: the run has a hard time limit (points past --budget are skipped)
  bench_ops(rec, lengths[:1], hyena_ops, args.width, ranks, budget, skip)
  if args.model_length:
    bench_model(rec, args.model_length, args.width, args.layers, ranks, budget,
                args.model_modes.split(","))
  bench_ops(rec, lengths[:1], [o for o in ops if o == "MHA"], args.width, ranks, budget, skip)
  bench_ops(rec, lengths[1:], hyena_ops, args.width, ranks, budget, skip)
  print(f"\n{info['device']} x {n}, {info['date']}, jax {info['jax']}\n")
  print(table(rec.rows), flush=True)


if __name__ == "__main__":
  main()
