"""The MAD synthetic benchmark (Poli et al. 2024) for our layouts: every (task, setting, layout)
trained with MAD's protocol over its 3 x 2 learning-rate x weight-decay grid (times ``--seeds``)
in one vmapped step (``sh2_jax/train/mad_sweep.py``), the best run per setting reported.

    python benchmarks/mad.py --workdir=runs/mad                      # all six tasks, baseline
    python benchmarks/mad.py --workdir=runs/mad --tasks=in_context_recall --layouts=MHA
    python benchmarks/mad.py --workdir=runs/mad --settings=all       # + every difficulty level
    python benchmarks/mad.py --smoke --workdir=runs/mad_smoke        # tiny, CPU

Rerunning the same command resumes: finished runs are read back, unfinished ones continue from
their last evaluated epoch.

One GPU, several processes: the grid's step is compute-bound on an H200 (6 workers kept it at
100% and trained no faster than one), so 2 workers are the useful number: each hides the
other's compiles. ``--parallel N`` trains the (task, setting, layout) items in N
worker processes sharing the device (each given ``XLA_PYTHON_CLIENT_MEM_FRACTION`` 0.9 / N,
preallocated), the largest items first, each worker taking the next item when it finishes one;
every item still trains its whole vmapped grid, in its own directory, and the parent writes the
results, table and plot from the workdir exactly as the serial path does. ``--budget_s S`` stops
every process at an epoch boundary before S seconds from the start (estimated from its own epoch
times), leaving state to resume from; unfinished items are marked in the table (``*``) and
listed under ``unfinished`` in the results. ``--pack FILE`` then writes the workdir as a
``.tar.gz`` (``sh2_jax/train/mad_archive.py``: curves, results and the state of unfinished runs
as far as it fits in ``--pack_volumes`` volumes ``FILE``, ``FILE.2``, ... of at most 15 MiB
each) and ``--unpack FILE`` merges such an archive (its volumes read from beside it) into the
workdir before training, so the sweep continues in a later session:

    python benchmarks/mad.py --workdir=runs/mad --parallel=2 --budget_s=520 \
        --save_every_s=60 --unpack=carry/mad.tar.gz --pack=out/mad.tar.gz

A sweep whose workdir (and archive) is gone continues from its results instead: ``--merge
RESULTS.json`` (a file this script wrote, with the same protocol) takes that call's finished
items into the results, table and plot as they are, trains only the rest in the new workdir,
and records where they came from under ``merged``; ``--merge_curves`` adds that call's
``--curves`` file, so that the new ``--curves`` holds every item's curves:

    python benchmarks/mad.py --workdir=runs/mad --patience=20 --merge=benchmarks/mad_h200.json \
        --merge_curves=benchmarks/mad_h200_curves.json --curves=out/mad_curves.json

The state of a group is saved after every epoch (``--save_every_s``: at most that often, and at
a budget stop; the per-epoch save of tens of MB slows a GPU worker). Writes ``--json``
(default ``<workdir>/results.json``: device, date, command, per setting the best run and every
run's final accuracy; the curves stay in
``<workdir>/<task>/<setting>/<layout>/curves.json``) and prints a markdown table: per task and
layout the test accuracy at the baseline (MAD's macro accuracy, per-token accuracy in brackets)
and the MAD score (the mean over all settings) where every setting finished.

Published numbers: the MAD code (github.com/athms/mad-lab) ships no result tables, and the
paper's per-task results are given in its figures. ``PUBLISHED`` holds the per-task MAD scores
of the figure the code ships (``assets/mad_to_scale.png``, the paper's MAD-vs-scale figure),
read off its markers (about +-0.003; each architecture's six values average to its mean on the
figure's left panel to 0.001): "Hyena + SwiGLU" (MAD's 2-block Hyena) and "Striped Hyena +
SwiGLU" (Hyena and attention blocks alternating). They are MAD scores, means over every
difficulty level, so they sit beside our MAD score column; beside a baseline accuracy they are
a floor (the baseline is the easiest level). The figure has no attention-only model, so that
column reads "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# task -> MAD scores read off mad-lab's assets/mad_to_scale.png (see the module docstring);
# "~1.00": markers overlapping at the top of the axis.
PUBLISHED: dict[str, dict] = {
    "in_context_recall": {"hyena": "0.818", "striped": "~1.00"},
    "fuzzy_in_context_recall": {"hyena": "0.079", "striped": "0.232"},
    "noisy_in_context_recall": {"hyena": "0.788", "striped": "~1.00"},
    "selective_copying": {"hyena": "0.931", "striped": "~1.00"},
    "compression": {"hyena": "0.452", "striped": "0.472"},
    "memorization": {"hyena": "0.895", "striped": "0.892"},
}
PUBLISHED_SOURCE = ("MAD paper columns: MAD scores (every level) read off mad-lab's "
                    "assets/mad_to_scale.png, +-0.003; no attention-only model there")

PACK_LIMIT_BYTES = 15 * 2**20  # a file back from one device call is at most 16 MiB
# a whole group's state (~28 MiB at MAD's sizes) needs two volumes; the 64 MiB that travel to
# a device call hold two beside the project and its wheels
PACK_VOLUMES = 2

# --smoke: the same generators at toy sizes (a few seconds of CPU per layout).
SMOKE_KWARGS = {
    "in_context_recall": dict(vocab_size=16, seq_len=16, num_train_examples=48),
    "fuzzy_in_context_recall": dict(vocab_size=16, seq_len=24, k_motif_size=2, v_motif_size=2,
                                    num_train_examples=48),
    "noisy_in_context_recall": dict(vocab_size=32, noise_vocab_size=16, seq_len=16,
                                    frac_noise=0.2, num_train_examples=48),
    "selective_copying": dict(vocab_size=16, seq_len=24, num_tokens_to_copy=4,
                              num_train_examples=48),
    "compression": dict(vocab_size=16, seq_len=8, num_train_examples=48),
    "memorization": dict(vocab_size=64, seq_len=8, num_train_examples=48),
}


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse prints the usage too)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _floats(name: str, text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    _fail(f"--{name} {text!r} is not a comma-separated list of numbers")
  if not values or any(v < 0 for v in values):
    _fail(f"--{name} {text!r} must list non-negative numbers")
  return values


def parse(argv=None):
  from sh2_jax.synthetic import mad
  from sh2_jax.config import CONV_IMPLS, LI_IMPLS
  from sh2_jax.train.mad_sweep import LAYOUTS
  ap = _Parser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="state, curves and results go here")
  ap.add_argument("--tasks", default="all", help="comma list of " + ", ".join(mad.TASKS))
  ap.add_argument("--layouts", default="all", help="comma list of " + ", ".join(LAYOUTS))
  ap.add_argument("--settings", default="baseline",
                  help="baseline, all, or a comma list of setting names (seq_len=256, ...)")
  ap.add_argument("--epochs", type=int, default=200)
  ap.add_argument("--patience", type=int, default=0,
                  help="stop a run after this many epochs without a better test accuracy "
                  "(0: MAD's default, only the 0.999 threshold stops)")
  ap.add_argument("--lrs", default=",".join(str(x) for x in mad.LEARNING_RATES))
  ap.add_argument("--wds", default=",".join(str(x) for x in mad.WEIGHT_DECAYS))
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--warmup_epochs", type=int, default=0, help="linear warmup (MAD: none)")
  ap.add_argument("--attention_impl", default="xla", choices=["xla", "cudnn"])
  ap.add_argument("--conv_impl", default="auto", choices=list(CONV_IMPLS),
                  help="SE/MR inner filters (the model's conv_impl; auto: the Pallas kernels on "
                  "a GPU, 2.2x fft's step on the H200)")
  ap.add_argument("--li_impl", default="auto", choices=list(LI_IMPLS),
                  help="LI inner filters (the model's li_impl; auto: modal_scan on a GPU)")
  ap.add_argument("--speed", type=int, default=0,
                  help="time this many epochs of every item after one that compiles, print "
                  "ms per step, and train nothing else (0: train)")
  ap.add_argument("--runs_per_group", type=int, default=0,
                  help="runs vmapped together (0: all); fewer to fit long sequences")
  ap.add_argument("--json", default="", help="results file (default <workdir>/results.json)")
  ap.add_argument("--plot", default="", help="bar chart of the baseline accuracies (a .png)")
  ap.add_argument("--smoke", action="store_true", help="toy sizes and 2 epochs, for CPU tests")
  ap.add_argument("--parallel", type=int, default=1,
                  help="worker processes sharing the device (1: this process trains)")
  ap.add_argument("--budget_s", type=float, default=0.0,
                  help="stop training at an epoch boundary before this many seconds from the "
                  "start (0: no limit)")
  ap.add_argument("--save_every_s", type=float, default=0.0,
                  help="save an unfinished group's state at most this often (and at a budget "
                  "stop; 0: after every epoch)")
  ap.add_argument("--curves", default="",
                  help="after the run: every run's per-epoch curves (losses, accuracies) of "
                  "the workdir as one JSON file here")
  ap.add_argument("--pack", default="",
                  help="after the run: the workdir as a .tar.gz here (in volumes FILE, FILE.2, "
                  "... of at most 15 MiB each)")
  ap.add_argument("--pack_volumes", type=int, default=PACK_VOLUMES,
                  help="at most this many volumes of --pack: the training state beyond them "
                  "is left out (its runs restart)")
  ap.add_argument("--unpack", default="",
                  help="before the run: merge a --pack archive (FILE, its volumes FILE.2, ... "
                  "read from beside it) into the workdir")
  ap.add_argument("--merge", default="",
                  help="an earlier call's results file (--json) of the same protocol: its "
                  "finished items are taken into the results, table and plot as they are and "
                  "not trained again (for a sweep whose workdir is gone)")
  ap.add_argument("--merge_curves", default="",
                  help="the --curves file of the --merge call: its merged items' curves join "
                  "this call's --curves")
  args = ap.parse_args(argv)

  tasks = list(mad.TASKS) if args.tasks == "all" else args.tasks.split(",")
  for t in tasks:
    if t not in mad.TASKS:
      _fail(f"task {t!r} is not one of {', '.join(mad.TASKS)}")
  layouts = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
  for lay in layouts:
    if lay not in LAYOUTS:
      _fail(f"layout {lay!r} is not one of {', '.join(LAYOUTS)}")
  plan = []
  for t in tasks:
    names = [n for n, _ in mad.settings(t)]
    if args.smoke:
      chosen = ["baseline"]
    elif args.settings == "all":
      chosen = names
    else:
      chosen = args.settings.split(",")
      for n in chosen:
        if n not in names:
          _fail(f"setting {n!r} of {t} is not one of {', '.join(names)}")
    for n in chosen:
      plan.append((t, n, SMOKE_KWARGS[t] if args.smoke else mad.setting(t, n)))
  for name in ("epochs", "patience", "runs_per_group", "warmup_epochs"):
    v = getattr(args, name)
    if v < (1 if name == "epochs" else 0):
      _fail(f"--{name} {v} must be {'a positive' if name == 'epochs' else 'a non-negative'} "
            "integer")
  if args.parallel < 1:
    _fail(f"--parallel {args.parallel} must be a positive integer (1: no worker processes)")
  if not args.budget_s >= 0 or args.budget_s == float("inf"):
    _fail(f"--budget_s {args.budget_s:g} must be a non-negative number of seconds (0: no limit)")
  if not args.save_every_s >= 0 or args.save_every_s == float("inf"):
    _fail(f"--save_every_s {args.save_every_s:g} must be a non-negative number of seconds "
          "(0: after every epoch)")
  if args.unpack:
    from sh2_jax.train import mad_archive
    try:
      mad_archive.check(args.unpack)
    except mad_archive.ArchiveError as e:
      _fail(f"--unpack: {e}")
  args.merged = _merged(args, plan, layouts, _config(args, *_grid(args))) if args.merge else None
  if args.merge_curves and not args.merge:
    _fail(f"--merge_curves {args.merge_curves!r} needs --merge (the results it belongs to)")
  if args.curves and not os.path.isdir(os.path.dirname(os.path.abspath(args.curves))):
    _fail(f"--curves {args.curves!r}: the folder "
          f"{os.path.dirname(os.path.abspath(args.curves))!r} does not exist")
  if not 1 <= args.pack_volumes <= 7:
    _fail(f"--pack_volumes {args.pack_volumes} must be 1 to 7 (a device call returns 8 files)")
  if args.pack:
    inside = os.path.relpath(os.path.abspath(args.pack), os.path.abspath(args.workdir))
    if not inside.startswith(".."):
      _fail(f"--pack {args.pack!r} is inside --workdir {args.workdir!r}; write it elsewhere")
    where = os.path.dirname(os.path.abspath(args.pack))
    if not os.path.isdir(where):
      _fail(f"--pack {args.pack!r}: the folder {where!r} does not exist")
  if args.parallel > 1:  # this process only coordinates: it must not take the device's memory
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if args.attention_impl == "cudnn":
    import jax
    if jax.default_backend() != "gpu":
      _fail(f"--attention_impl cudnn needs a GPU; this backend is {jax.default_backend()} "
            "(use xla)")
  if args.speed < 0:
    _fail(f"--speed {args.speed} must be a non-negative integer (0: train)")
  from sh2_jax import dispatch
  for name, resolve in (("conv_impl", dispatch.resolve_conv_impl),
                        ("li_impl", dispatch.resolve_li_impl)):
    try:
      resolve(getattr(args, name))
    except ValueError as e:
      _fail(f"--{name}: {e}")
  if args.plot:
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
      _fail(f"--plot {args.plot!r} needs matplotlib (the 'bench' extra); install it or leave "
            "--plot out")
  return args, tasks, layouts, plan, *_grid(args)


def _grid(args):
  """The learning rates, weight decays and seeds of the flags."""
  try:
    seeds = tuple(int(s) for s in args.seeds.split(","))
  except ValueError:
    _fail(f"--seeds {args.seeds!r} is not a comma-separated list of integers")
  return _floats("lrs", args.lrs), _floats("wds", args.wds), seeds


def _read_json(flag: str, path: str, key: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    _fail(f"--{flag} {path!r} does not exist")
  except (OSError, ValueError) as e:
    _fail(f"--{flag} {path!r} is not a JSON file: {e}")
  if not isinstance(data, dict) or not isinstance(data.get(key), dict):
    _fail(f"--{flag} {path!r} has no {key!r}: it is not a file this script wrote")
  return data


def _merged(args, plan, layouts, cfg) -> dict:
  """--merge: the earlier call's finished items of this plan, and their curves
  (--merge_curves): {source: {date, device, command}, results: task -> setting -> layout ->
  entry, curves: the same for the curves}. Refuses a file of another protocol (the training
  fields of the config, the implementations aside) or whose items have other kwargs."""
  import dataclasses
  from sh2_jax.train.mad_sweep import protocol
  old = _read_json("merge", args.merge, "results")
  ours, theirs = protocol(dataclasses.asdict(cfg)), protocol(old.get("config"))
  if theirs != ours:
    diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    _fail(f"--merge {args.merge!r} was trained with another protocol: "
          + ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff))
  cur = _read_json("merge_curves", args.merge_curves, "curves") if args.merge_curves else None
  if cur is not None and (cur.get("date"), cur.get("command")) != (old.get("date"),
                                                                  old.get("command")):
    _fail(f"--merge_curves {args.merge_curves!r} is from another call ({cur.get('date')}) than "
          f"--merge {args.merge!r} ({old.get('date')})")
  results, curves_ = {}, {}
  for task, name, kwargs in plan:
    for lay in layouts:
      entry = old["results"].get(task, {}).get(name, {}).get(lay)
      if not entry or not entry.get("complete"):
        continue
      if json.loads(json.dumps(kwargs)) != entry.get("kwargs"):
        _fail(f"--merge {args.merge!r}: {task} {name} {lay} was made with other data "
              f"({entry.get('kwargs')}, here {kwargs})")
      curve = (cur["curves"].get(task, {}).get(name, {}).get(lay) if cur else None)
      if cur is not None and not (curve and curve.get("complete")):
        _fail(f"--merge_curves {args.merge_curves!r} has no finished {task} {name} {lay}")
      results.setdefault(task, {}).setdefault(name, {})[lay] = entry
      if curve:
        curves_.setdefault(task, {}).setdefault(name, {})[lay] = curve
  return {"source": {k: old.get(k) for k in ("date", "device", "command")},
          "results": results, "curves": curves_}


def _merged_items(merged) -> set:
  return {(t, n, lay) for t, per in (merged or {}).get("results", {}).items()
          for n, lays in per.items() for lay in lays}


def _fold(mine: dict, theirs: dict) -> dict:
  """``theirs`` (task -> setting -> layout -> entry) where ``mine`` has no finished entry."""
  out = {t: {n: dict(lays) for n, lays in per.items()} for t, per in mine.items()}
  for t, per in theirs.items():
    for n, lays in per.items():
      for lay, entry in lays.items():
        if not (out.get(t, {}).get(n, {}).get(lay) or {}).get("complete"):
          out.setdefault(t, {}).setdefault(n, {})[lay] = entry
  return out


def _records(workdir: str, tasks, layouts):
  """(task, setting, layout, curves.json record) of every setting under ``workdir`` that has
  one (this command's or an earlier one's), in plan order."""
  from sh2_jax.synthetic import mad
  for t in tasks:
    for name, _ in mad.settings(t):
      for lay in layouts:
        path = os.path.join(workdir, t, name, lay, "curves.json")
        if os.path.exists(path):
          with open(path) as f:
            yield t, name, lay, json.load(f)


def collect(workdir: str, tasks, layouts) -> dict:
  """Every finished or partial setting under ``workdir``: task -> setting -> layout ->
  {complete, best, kwargs, epochs, runs (final accuracies)}."""
  results: dict = {}
  for t, name, lay, rec in _records(workdir, tasks, layouts):
    results.setdefault(t, {}).setdefault(name, {})[lay] = {
        "complete": rec.get("complete", False), "best": rec.get("best"),
        "kwargs": rec["kwargs"],
        "epochs": max((len(r["curve"]) for r in rec["runs"]), default=0),
        "runs": [{k: r.get(k) for k in ("lr", "weight_decay", "seed", "test_acc",
                                        "test_token_acc", "best_epoch", "test_acc_final",
                                        "done")} for r in rec["runs"]]}
  return results


CURVE_KEYS = ("train_loss", "test_loss", "test_acc", "test_token_acc")


def curves(workdir: str, tasks, layouts) -> dict:
  """Every run's per-epoch curve under ``workdir``, the plateau the results rest on: task ->
  setting -> layout -> {complete, best, runs: [{lr, weight_decay, seed, done, best_epoch,
  <CURVE_KEYS>: one value per epoch, 4 significant digits}]}."""
  out: dict = {}
  for t, name, lay, rec in _records(workdir, tasks, layouts):
    out.setdefault(t, {}).setdefault(name, {})[lay] = {
        "complete": rec.get("complete", False), "best": rec.get("best"),
        "runs": [{**{k: r.get(k) for k in ("lr", "weight_decay", "seed", "done", "best_epoch")},
                  **{k: [float(f"{c[k]:.4g}") for c in r["curve"]] for k in CURVE_KEYS}}
                 for r in rec["runs"]]}
  return out


def table(results: dict, tasks, layouts) -> str:
  from benchmarks.common import markdown_table
  from sh2_jax.synthetic import mad
  rows = []
  for t in tasks:
    for lay in layouts:
      per = results.get(t, {})
      base = per.get("baseline", {}).get(lay)
      cell = "–" if not base or not base.get("best") else (
          f"{base['best']['test_acc']:.3f} ({base['best']['test_token_acc']:.3f})"
          + ("" if base["complete"] else " *"))
      names = [n for n, _ in mad.settings(t)]
      done = [per.get(n, {}).get(lay) for n in names]
      score = (f"{sum(d['best']['test_acc'] for d in done) / len(done):.3f}"
               if all(d and d.get("complete") and d.get("best") for d in done) else "–")
      pub = PUBLISHED.get(t, {})
      rows.append([t, lay, cell, score, pub.get("attention", "n/a"), pub.get("hyena", "n/a"),
                   pub.get("striped", "n/a")])
  return markdown_table(["task", "layout", "baseline test acc (token)", "MAD score",
                         "MAD paper: attention", "MAD paper: Hyena",
                         "MAD paper: striped Hyena + attention"], rows) + "\n" + PUBLISHED_SOURCE


def plot(results: dict, tasks, layouts, path: str, title: str) -> None:
  """Grouped bars: per task, the baseline test accuracy (best of the grid) of each layout, and
  the MAD paper's scores (``PUBLISHED``, figure reads, means over every level) as markers across
  each task's group; an unfinished item's bar is hatched."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4.0))
  width = 0.8 / len(layouts)
  for j, lay in enumerate(layouts):
    entries = [results.get(t, {}).get("baseline", {}).get(lay) or {} for t in tasks]
    ys = [(e.get("best") or {}).get("test_acc", 0.0) for e in entries]
    bars = ax.bar([i + (j - (len(layouts) - 1) / 2) * width for i in range(len(tasks))], ys,
                  width, label=lay)
    for bar, e in zip(bars, entries):
      if e and not e.get("complete"):
        bar.set_hatch("///")
  for key, marker, label in (("hyena", "_", "MAD paper: Hyena"),
                             ("striped", "x", "MAD paper: striped Hyena + attention")):
    pts = [(i, float(PUBLISHED[t][key].lstrip("~"))) for i, t in enumerate(tasks)
           if key in PUBLISHED.get(t, {})]
    if pts:
      ax.scatter(*zip(*pts), marker=marker, s=400 if marker == "_" else 40, color="black",
                 linewidths=1.5, zorder=3, label=label)
  ax.set_xticks(range(len(tasks)), [t.replace("_", " ") for t in tasks], fontsize=7)
  ax.set_ylim(0, 1.02)
  ax.set_ylabel("test accuracy (MAD, baseline)")
  ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def _config(args, lrs, wds, seeds):
  from sh2_jax.train.mad_sweep import MADTrainConfig
  if args.smoke:
    return MADTrainConfig(d_model=16, num_heads=2, mlp_hidden=32, batch_size=16, epochs=2,
                          learning_rates=lrs[:1], weight_decays=wds[:2], seeds=seeds[:1],
                          dtype="float32", num_test_examples=32,
                          attention_impl=args.attention_impl, conv_impl=args.conv_impl,
                          li_impl=args.li_impl)
  return MADTrainConfig(epochs=args.epochs, patience=args.patience, learning_rates=lrs,
                        weight_decays=wds, seeds=seeds, dtype=args.dtype,
                        runs_per_group=args.runs_per_group,
                        warmup_epochs=args.warmup_epochs, attention_impl=args.attention_impl,
                        conv_impl=args.conv_impl, li_impl=args.li_impl)


def _cost(item) -> float:
  """Relative training time of an item: steps per epoch x length x blocks."""
  from sh2_jax.synthetic import mad
  from sh2_jax.train.mad_sweep import LAYOUTS
  task, _, kwargs, layout = item
  n = kwargs.get("num_train_examples", mad.BASELINES[task]["num_train_examples"])
  return -(-n // 128) * kwargs.get("seq_len", 128) * max(2, len(LAYOUTS[layout].split("-")))


def _item_line(rec: dict, seconds: float) -> str:
  stop = " -- stopped by --budget_s, unfinished" if rec["timing"]["stopped_by_budget"] else ""
  return (f"{rec['task']} {rec['setting']} {rec['layout']}: best {rec.get('best')} "
          f"({seconds:.1f} s){stop}")


def _worker(index: int, cfg, workdir: str, deadline, save_every_s, todo, done) -> None:
  """One worker process: trains items from ``todo`` until it reads None; reports to ``done``."""
  import traceback
  from sh2_jax.train.mad_sweep import Budget, train_setting
  budget = Budget(deadline)
  say = lambda s: print(f"[w{index}] {s}", flush=True)
  while (item := todo.get()) is not None:
    task, name, kwargs, lay = item
    if not budget.allows(budget.first_epoch_s):
      done.put(("skipped", item, None))
      continue
    t0 = time.perf_counter()
    try:
      rec = train_setting(cfg, task, name, kwargs, lay, workdir, log=say, budget=budget,
                          save_every_s=save_every_s)
    except Exception:  # the other items go on; the parent reports it and exits 1
      say(traceback.format_exc())
      done.put(("failed", item, traceback.format_exc().strip().splitlines()[-1]))
      continue
    say(_item_line(rec, time.perf_counter() - t0))
    done.put(("trained", item, {**rec["timing"], "worker": index}))
  done.put(("exit", index, None))


def _train_parallel(cfg, items, workdir: str, n: int, deadline, save_every_s,
                    on_item) -> dict:
  """Train ``items`` in ``n`` spawned workers sharing the device, calling ``on_item()`` after
  each one that trained; -> item -> (status, info)."""
  import multiprocessing as mp
  import queue
  ctx = mp.get_context("spawn")  # a forked JAX runtime is not safe
  todo, done = ctx.Queue(), ctx.Queue()
  for item in sorted(items, key=_cost, reverse=True):
    todo.put(item)
  n = min(n, len(items))
  for _ in range(n):
    todo.put(None)
  procs = []
  for i in range(n):  # the environment is read when each worker's runtime starts
    os.environ.update(XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / n:.3f}",
                      XLA_PYTHON_CLIENT_PREALLOCATE="true")
    procs.append(ctx.Process(target=_worker, args=(i, cfg, workdir, deadline, save_every_s,
                                                           todo, done)))
    procs[-1].start()
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  status, exited = {}, 0
  while exited < n:
    try:
      kind, item, info = done.get(timeout=1.0)
    except queue.Empty:
      if any(p.is_alive() for p in procs):
        continue
      try:  # every worker is gone: what they sent is in the pipe
        kind, item, info = done.get(timeout=1.0)
      except queue.Empty:
        break
    if kind == "exit":
      exited += 1
    else:
      status[item[:2] + item[3:]] = (kind, info)
      if kind == "trained":
        on_item()
  for p in procs:
    p.join()
  for i, p in enumerate(procs):
    if p.exitcode != 0:
      print(f"error: worker {i} exited with code {p.exitcode}", file=sys.stderr)
  for task, name, _, lay in items:  # items a dead worker held
    status.setdefault((task, name, lay), ("failed", "its worker died"))
  return status


def _write_results(out: dict, out_path: str, plan_items, tasks, layouts, merged=None) -> None:
  """results.json from everything under the workdir (and the finished items of ``merged``
  that it lacks), and the items of this command that are not finished."""
  out["results"] = _fold(collect(out["workdir"], tasks, layouts),
                         (merged or {}).get("results", {}))
  out["table"] = table(out["results"], tasks, layouts)
  out["unfinished"] = []
  for task, name, _, lay in plan_items:
    entry = out["results"].get(task, {}).get(name, {}).get(lay)
    if not entry or not entry["complete"]:
      out["unfinished"].append({"task": task, "setting": name, "layout": lay,
                                "epochs": entry["epochs"] if entry else 0})
  with open(out_path, "w") as f:
    json.dump({k: v for k, v in out.items() if k != "workdir"}, f, indent=1)


def _progress_table(status: dict, results: dict, epochs: int) -> str:
  """This call per item: what it did, its worker, epochs, seconds per epoch (the first one
  compiles), steps per second, for an unfinished item the most seconds it still needs (every
  run to the last epoch, at this call's pace), and its worker's peak device memory so far."""
  from benchmarks.common import markdown_table
  rows = []
  for (task, name, lay), (kind, info) in status.items():
    t = info if isinstance(info, dict) else {}
    entry = results.get(task, {}).get(name, {}).get(lay) or {"complete": False, "epochs": 0}
    left = ("0" if entry["complete"] else
            f"{(epochs - entry['epochs']) * t['epoch_s']:.0f}" if t.get("epoch_s") else "?")
    rows.append([task, name, lay, kind if kind != "trained" or not t.get("stopped_by_budget")
                 else "budget stop", t.get("worker", "–"), t.get("epochs", 0),
                 f"{t['first_epoch_s']:.1f}" if t.get("first_epoch_s") else "–",
                 f"{t['epoch_s']:.2f}" if t.get("epoch_s") else "–",
                 f"{t['steps_per_s']:.1f}" if t.get("steps_per_s") else "–", left,
                 f"{t['peak_gib']:.1f}" if t.get("peak_gib") else "–",
                 info if isinstance(info, str) else ""])
  return markdown_table(["task", "setting", "layout", "this call", "worker", "epochs",
                         "first epoch s", "epoch s", "steps/s", "left s (max)",
                         "worker peak GiB", "note"], rows)


def speed(cfg, items, workdir: str, epochs: int) -> list[dict]:
  """Per item: one epoch of its whole grid that compiles, then ``epochs`` timed ones (the
  median reported) and one timed evaluation; trains nothing that is kept."""
  rows = []
  for item in items:
    try:
      rows.append(_speed_item(cfg, item, workdir, epochs))
    except Exception as e:  # noqa: BLE001 -- a variant that does not compile is a row too
      task, name, _, lay = item
      rows.append({"task": task, "setting": name, "layout": lay,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
      print(f"{task} {name} {lay}: failed: {rows[-1]['error']}", flush=True)
      continue
    r = rows[-1]
    print(f"{r['task']} {r['setting']} {r['layout']}: {r['ms_per_step']:.2f} ms per step of "
          f"{r['runs']} runs ({r['tokens_per_s'] / 1e6:.2f} M tokens/s), compile "
          f"{r['compile_s']:.1f} s, evaluation {r['eval_s']:.2f} s", flush=True)
  return rows


def _speed_item(cfg, item, workdir: str, epochs: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sh2_jax.synthetic import mad
  from sh2_jax.train.mad_sweep import compiled_group, load_data
  """One item of ``speed``: its row (raises when the variant does not compile)."""
  task, name, kwargs, lay = item
  train_x, train_y, test_x, test_y = load_data(cfg, task, kwargs,
                                               os.path.join(workdir, task, name))
  n_train, length = train_x.shape
  vocab = kwargs.get("vocab_size", mad.BASELINES[task]["vocab_size"])
  t0 = time.perf_counter()
  group = compiled_group(cfg.model_config(lay, vocab, length), task, length, n_train,
                         cfg.batch_size)
  runs = len(cfg.runs())
  params, adam = group.init(jnp.stack([jax.random.key(i) for i in range(runs)]))
  dx, dy = jnp.asarray(train_x), jnp.asarray(train_y)
  order = np.stack([np.random.default_rng([i, 0]).permutation(
      group.steps * cfg.batch_size) % n_train for i in range(runs)])
  order = jnp.asarray(order.reshape(runs, group.steps, cfg.batch_size), jnp.int32)
  lr = jnp.full((runs,), 1e-4, jnp.float32)
  wd = jnp.zeros((runs,), jnp.float32)
  active = jnp.ones((runs,), bool)
  params, adam, loss = group.epoch(params, adam, dx, dy, order, lr, wd, active)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(epochs):
    t1 = time.perf_counter()
    params, adam, loss = group.epoch(params, adam, dx, dy, order, lr, wd, active)
    loss.block_until_ready()
    times.append(time.perf_counter() - t1)
  eb = min(cfg.batch_size, len(test_x))
  n_eval = len(test_x) // eb * eb
  tx = jnp.asarray(test_x[:n_eval].reshape(-1, eb, length))
  ty = jnp.asarray(test_y[:n_eval].reshape(-1, eb, length))
  jax.block_until_ready(group.evaluate(params, tx, ty))
  t1 = time.perf_counter()
  jax.block_until_ready(group.evaluate(params, tx, ty))
  eval_s = time.perf_counter() - t1
  epoch_s = float(np.median(times))
  stats = jax.local_devices()[0].memory_stats() or {}
  return ({"task": task, "setting": name, "layout": lay, "runs": runs,
               "seq_len": length, "steps_per_epoch": group.steps, "compile_s": compile_s,
               "epoch_s": epoch_s, "ms_per_step": 1e3 * epoch_s / group.steps,
               "tokens_per_s": runs * cfg.batch_size * length * group.steps / epoch_s,
               "eval_s": eval_s, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
               "loss": float(np.asarray(loss).mean())})


def _command(argv) -> str:
  """This command as run, for the results: the script's name and its arguments, an absolute
  path in them cut to its file name (a record names no machine's folders)."""
  def short(arg):
    name, eq, value = arg.partition("=")
    if eq and os.path.isabs(value):
      return f"{name}={os.path.basename(value)}"
    return os.path.basename(arg) if os.path.isabs(arg) else arg
  return shlex.join([os.path.basename(sys.argv[0])]
                    + [short(a) for a in (sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> dict:
  t_start = time.time()
  args, tasks, layouts, plan, lrs, wds, seeds = parse(argv)
  import dataclasses
  from benchmarks.common import device_info
  from sh2_jax.train import mad_archive
  from sh2_jax.train.mad_sweep import Budget, train_setting
  deadline = t_start + args.budget_s if args.budget_s else None
  cfg = _config(args, lrs, wds, seeds)
  if args.speed:
    from benchmarks.common import markdown_table
    items = [(task, name, kwargs, lay) for task, name, kwargs in plan for lay in layouts]
    rows = speed(cfg, items, args.workdir, args.speed)
    out = {**device_info(), "command": _command(argv),
           "config": dataclasses.asdict(cfg), "speed": rows}
    print(markdown_table(
        ["task", "layout", "conv/li/attention", "L", "ms per step", "M tokens/s",
         "compile s", "evaluation s", "peak GiB"],
        [[r["task"], r["layout"], f"{cfg.conv_impl}/{cfg.li_impl}/{cfg.attention_impl}"]
         + ([r["seq_len"], f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s'] / 1e6:.2f}",
             f"{r['compile_s']:.1f}", f"{r['eval_s']:.2f}", f"{r['peak_gib']:.1f}"]
            if "error" not in r else [r["error"], "–", "–", "–", "–", "–"])
         for r in rows]))
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(out) + "\n")
    return out
  if args.unpack:
    mad_archive.unpack(args.unpack, args.workdir)
  os.makedirs(args.workdir, exist_ok=True)
  out_path = args.json or os.path.join(args.workdir, "results.json")
  out = {**device_info(), "command": _command(argv),
         "config": dataclasses.asdict(cfg), "results": {}, "workdir": args.workdir}
  items = [(task, name, kwargs, lay) for task, name, kwargs in plan for lay in layouts]
  if args.merged:  # taken from the earlier call: not trained here
    done = _merged_items(args.merged)
    out["merged"] = {**args.merged["source"], "items": [list(k) for k in sorted(done)]}
    items = [i for i in items if (i[0], i[1], i[3]) not in done]
    print(f"merge: {len(done)} finished items from {os.path.basename(args.merge)} "
          f"({args.merged['source']['date']}), {len(items)} to train", flush=True)

  def on_item(final=False):
    """After every item: results.json and the archive, so that a call killed at its time limit
    still leaves both behind."""
    _write_results(out, out_path, items, tasks, layouts, args.merged)
    if not args.pack:
      return None
    try:
      return mad_archive.pack(args.workdir, args.pack, PACK_LIMIT_BYTES,
                              log=print if final else lambda s: None, parts=args.pack_volumes)
    except mad_archive.ArchiveError as e:
      if final:
        _fail(f"--pack {args.pack!r}: {e}")
      print(f"pack: {e} (tried again at the end)", flush=True)

  if args.parallel > 1:
    status = _train_parallel(cfg, items, args.workdir, args.parallel, deadline,
                             args.save_every_s, on_item)
  else:
    status, budget = {}, Budget(deadline)
    for task, name, kwargs, lay in items:
      if not budget.allows(budget.first_epoch_s):
        status[(task, name, lay)] = ("skipped", None)
        continue
      t0 = time.perf_counter()
      rec = train_setting(cfg, task, name, kwargs, lay, args.workdir,
                          log=lambda s: print(s, flush=True), budget=budget,
                          save_every_s=args.save_every_s)
      status[(task, name, lay)] = ("trained", {**rec["timing"], "worker": 0})
      print(_item_line(rec, time.perf_counter() - t0), flush=True)
      on_item()
  out["timing"] = [{"task": k[0], "setting": k[1], "layout": k[2], "status": kind,
                    **(info if isinstance(info, dict) else {"note": info})}
                   for k, (kind, info) in status.items()]
  manifest = on_item(final=True)
  if args.curves:
    from sh2_jax import files
    files.write_json(args.curves, {k: out[k] for k in ("device", "date", "command")}
                     | {"curves": _fold(curves(args.workdir, tasks, layouts),
                                        (args.merged or {}).get("curves", {}))}
                     | ({"merged": out["merged"]} if args.merged else {}))
  if args.plot:
    plot(out["results"], tasks, layouts, args.plot,
         f"{out['device']}, {out['date']}: best of the lr x wd grid"
         + (f" ({len(_merged_items(args.merged))} items from {args.merged['source']['date']})"
            if args.merged else ""))
  steps = sum(i["epochs"] * i["steps_per_epoch"] for _, i in status.values()
              if isinstance(i, dict))
  wall = time.time() - t_start
  print("\n" + _progress_table(status, out["results"], cfg.epochs)
        + f"\nthis call: {steps} steps of {len(cfg.runs())} runs in {wall:.0f} s "
        f"({steps / wall:.1f} steps/s over {args.parallel} process(es), compiles included)")
  print("\n" + out["table"] + "\n(* : not finished; MAD score: mean over every setting)")
  if out["unfinished"]:
    print(f"{len(out['unfinished'])} of {len(items)} items unfinished: rerun the same command "
          "to resume them")
  if args.pack:
    kept = sum(v["state"] for v in manifest["items"].values())
    vols = mad_archive.volumes(args.pack)
    print(f"pack: {args.pack} ({sum(map(os.path.getsize, vols)) / 2**20:.2f} MiB in "
          f"{len(vols)} volume(s), "
          f"{len(manifest['items'])} items, {kept} with training state)")
  failed = [k for k, (kind, _) in status.items() if kind == "failed"]
  if failed:
    print(f"error: {len(failed)} items failed: " + ", ".join(" ".join(k) for k in failed),
          file=sys.stderr)
    sys.exit(1)
  out.pop("workdir")
  return out


if __name__ == "__main__":
  main()
