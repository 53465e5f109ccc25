"""Which operators solve which token-manipulation task: small models of each layout (SE-only,
MR-only, LI-only, MHA-only, SE-MR-LI-MHA, SE-SE-LI) trained with an equal budget (same model
width and depth, steps, batches, learning rates) on every synthetic task at several difficulty
levels (sequence length and number of pairs / tokens grow together).

    python benchmarks/synthetic.py                 # the full sweep (one GPU, a few minutes)
    python benchmarks/synthetic.py --cpu_small     # a reduced sweep that fits a CPU
    python benchmarks/synthetic.py --budget_s=150  # pick the step count to fit 150 s of training

Prints a markdown table (eval query accuracy, the best over the learning rates) and writes
``--json`` and the plot ``--plot``. Evaluation is on held-out examples (the eval split).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUT_NAMES = {"SE": "SE-only", "MR": "MR-only", "LI": "LI-only", "MHA": "MHA-only",
                "SE-MR-LI-MHA": "SE-MR-LI-MHA", "SE-SE-LI": "SE-SE-LI"}


def problems(cpu_small: bool) -> list[tuple[str, str, int, dict]]:
  """(task, level name, seq_len, params). Levels scale the length and the number of pairs /
  tokens together; recall keys and values come from 64-symbol alphabets (chance 1/64; 16 in the
  CPU sweep), copy data from 16 symbols (chance 1/16)."""
  levels = [(24, 3), (32, 6)] if cpu_small else [(64, 8), (128, 16), (256, 32)]
  kv = 16 if cpu_small else 64
  out = []
  for length, n in levels:
    name = f"L{length}/n{n}"
    out += [("ar", name, length, dict(n_pairs=n, vocab=kv)),
            ("mqar", name, length, dict(n_pairs=n, vocab=kv)),
            ("mtr", name, length, dict(n_pairs=max(n // 2, 2), vocab=kv, value_len=2)),
            ("selective_copy", name, length, dict(n_tokens=n, vocab=16)),
            ("compression", name, length, dict(n_tokens=n, vocab=16, noise_vocab=16))]
  return out


def table(results: dict, probs, layouts) -> str:
  head = "| task | level | chance | " + " | ".join(LAYOUT_NAMES[x] for x in layouts) + " |"
  lines = [head, "|" + "---|" * (3 + len(layouts))]
  for i, (task, level, _, params) in enumerate(probs):
    chance = 1.0 / params["vocab"]
    cells = []
    for lay in layouts:
      best = max(results[lay][i], key=lambda r: r["query_acc"])
      cells.append(f"{best['query_acc']:.2f} ({best['token_acc']:.2f})")
    lines.append(f"| {task} | {level} | {chance:.3f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, probs, layouts, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(dict.fromkeys(p[0] for p in probs))
  levels = list(dict.fromkeys(p[1] for p in probs))
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.3), sharey=True)
  for ax, task in zip(axes, tasks):
    for lay in layouts:
      ys = [max(results[lay][i], key=lambda r: r["query_acc"])["query_acc"]
            for i, p in enumerate(probs) if p[0] == task]
      ax.plot(range(len(levels)), ys, marker="o", label=LAYOUT_NAMES[lay],
              linewidth=2.5 if lay == "SE-MR-LI-MHA" else 1.3)
    ax.set_title(task)
    ax.set_xticks(range(len(levels)), levels, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("eval query accuracy (exact match)")
  axes[-1].legend(fontsize=7, loc="lower left")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--cpu_small", action="store_true", help="reduced sweep for a CPU")
  ap.add_argument("--layouts", default=",".join(LAYOUT_NAMES))
  ap.add_argument("--steps", type=int, default=0, help="0: from --budget_s (else a default)")
  ap.add_argument("--budget_s", type=float, default=0.0,
                  help="seconds of training for all layouts together; sets --steps")
  ap.add_argument("--max_steps", type=int, default=4000)
  ap.add_argument("--d_model", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=0)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--lr_scales", default="1,3", help="each problem is trained at lr * each")
  ap.add_argument("--n_train", type=int, default=0)
  ap.add_argument("--n_eval", type=int, default=256)
  ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)))
  ap.add_argument("--json", default="synthetic_results.json")
  ap.add_argument("--plot", default="docs/synthetic.png")
  args = ap.parse_args(argv)

  small = args.cpu_small
  if small:  # XLA:CPU's multi-threaded Eigen pool deadlocks on the vmapped LI backward here
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
  layouts = args.layouts.split(",")
  for lay in layouts:
    if lay not in LAYOUT_NAMES:
      raise SystemExit(f"error: layout {lay!r} is not one of {', '.join(LAYOUT_NAMES)}")
  probs = problems(small)
  length = max(p[2] for p in probs)
  n_train = args.n_train or (2048 if small else 16384)

  from sh2_jax.synthetic.tasks import TaskSpec  # numpy only: generate before JAX starts
  specs = [TaskSpec.make(t, L, seed=0, **p) for t, _, L, p in probs]
  t0 = time.perf_counter()
  from sh2_jax.train.synthetic_sweep import (SweepConfig, compile_layouts, device_pool, make_pools,
                                       time_call, train_and_eval)
  train_pool = make_pools(specs, n_train, "train", length, args.workers)
  eval_pool = make_pools(specs, args.n_eval, "eval", length, args.workers)
  print(f"generated {len(specs)} problems x ({n_train} train + {args.n_eval} eval) examples "
        f"in {time.perf_counter() - t0:.1f} s", flush=True)

  import jax
  cfg = SweepConfig(
      d_model=args.d_model or (64 if small else 128), num_layers=4, num_heads=2,
      mlp_hidden=2 * (args.d_model or (64 if small else 128)),
      steps=100, batch_size=args.batch_size or (16 if small else 64),
      learning_rate=args.lr, n_train=n_train, n_eval=args.n_eval,
      steps_per_call=25 if small else 100,
      lr_scales=tuple(float(x) for x in args.lr_scales.split(",")))
  t0 = time.perf_counter()
  compiled = compile_layouts(cfg, layouts, len(specs), length, n_train, args.n_eval)
  print(f"compiled {len(layouts)} layouts in {time.perf_counter() - t0:.1f} s "
        f"({jax.devices()[0].device_kind})", flush=True)
  pool = device_pool(train_pool)

  spc = cfg.steps_per_call
  if args.steps:
    steps = args.steps
  elif args.budget_s:
    per_call = {lay: time_call(c, pool) for lay, c in compiled.items()}
    print("seconds per step: " + ", ".join(f"{k} {v / spc * 1e3:.1f} ms"
                                          for k, v in per_call.items()), flush=True)
    steps = int(args.budget_s / sum(per_call.values())) * spc
  else:
    steps = 200 if small else 2000
  steps = max(spc, min(steps - steps % spc, args.max_steps))
  import dataclasses
  cfg = dataclasses.replace(cfg, steps=steps)  # the schedule is traced: no recompilation
  print(f"training every layout for {steps} steps of batch {cfg.batch_size} per problem, "
        f"{len(specs)} problems x {len(cfg.lr_scales)} learning rates", flush=True)

  results, timings = {}, {}
  for lay in layouts:
    t0 = time.perf_counter()
    results[lay] = train_and_eval(cfg, compiled[lay], pool, eval_pool,
                                  log=lambda s: print(s, flush=True))
    results[lay] = [results[lay][i * len(cfg.lr_scales):(i + 1) * len(cfg.lr_scales)]
                    for i in range(len(specs))]
    timings[lay] = time.perf_counter() - t0
    print(f"{lay}: {timings[lay]:.1f} s", flush=True)
    if args.json:  # a run cut short by a time limit keeps the layouts it finished
      with open(args.json, "w") as f:
        json.dump({"partial": True, "config": dataclasses.asdict(cfg), "results": results,
                   "train_seconds": timings}, f, indent=1)

  device = jax.devices()[0].device_kind
  title = (f"{device}: d_model {cfg.d_model}, 4 layers, {steps} steps x batch "
           f"{cfg.batch_size}, lr {cfg.learning_rate:g} x {cfg.lr_scales} (best shown)")
  md = table(results, probs, layouts)
  print("\n" + title + "\nquery accuracy (token accuracy), eval split\n" + md, flush=True)
  out = {"device": device, "config": dataclasses.asdict(cfg), "layouts": layouts,
         "problems": [dict(task=t, level=lv, seq_len=L, **p) for t, lv, L, p in probs],
         "results": results, "train_seconds": timings, "table": md, "title": title}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  if args.plot:
    plot(results, probs, layouts, args.plot, title)
  return out


if __name__ == "__main__":
  main()
