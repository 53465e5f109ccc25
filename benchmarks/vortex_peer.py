"""Ours beside the reference PyTorch implementation (vortex, used by the ``evo2`` package), one card,
one call: the parallel forward at 8K / 32K / 128K (B = 1) and cached decoding at batch 1 and 16
after an 8K prompt, for the evo2_7b shape (evo2-7b-8k: width 4096, 32 layers SE-MR-LI-MHA..., MHA
at 3/10/17/24/31, 256 filter groups, MLP 11008; our preset ``evo2_7b_base``), random weights, bf16,
FP8 off.

Three processes, one after the other, so that torch and JAX never share the card's memory:
  1. ``--side vortex`` (``benchmarks/vortex_torch.py``): vortex's own ``StripedHyena`` from its own
     YAML (``--config``, default ``configs/evo2-7b-8k.yml`` of the vortex source), its parallel
     forward, and its generation path (``initialize_inference_params``, a prefill call, then one
     call per token); the module docstring there lists every setting that differs from the YAML.
  2. ``--child --side ours_forward``: our ``StripedHyena`` (``benchmarks/decode.py``'s random build, every
     implementation ``auto``), the jitted forward, with ``XLA_PYTHON_CLIENT_MEM_FRACTION``.
  3. ``benchmarks/decode.py`` itself for our decoding (its table is read back), same variable.
Timing: the median method of ``benchmarks/common.timeit`` (torch: the same loop closed by
``torch.cuda.synchronize``); decoding: median of ``--reps`` loops of ``--steps`` greedy steps after
a warm-up loop. Bytes per decode step: vortex's = parameters + its whole cache; ours = decode.py's
must-read count (parameters + the KV cache up to the position + the Hyena states); each side's process
measures its own copy rate (torch: a 1 GiB device-to-device copy; JAX: ``common.copy_bandwidth``).
Points that would overrun ``--budget_s`` are skipped with a note; an OOM is a note.
Output: ``OUT/vortex_peer.jsonl`` (one row per point: kind, impl, L, batch, ms, tokens_per_s,
device, date, command, ...), ``OUT/vortex_peer.md`` (the tables), and each side's own JSONL.

On the GPU machine (torch, triton and JAX there; no network, no flash_attn). Once, here, put a copy
of the vortex source (github.com/Zymrael/vortex; only ``vortex/``, ``configs/`` and
``pyproject.toml`` are needed, about 1.6 MB) in a folder git ignores:
  echo /.vortex/ >> .git/info/exclude
  mkdir -p .vortex && git --git-dir=<a clone of vortex>/.git archive HEAD vortex configs \
    pyproject.toml | tar -x -C .vortex
then device calls with ``carry: [".vortex"]`` (commands from the repository root):
  # 1. cheap check of both sides at tiny shapes (vortex builds, imports, prefill + decode run):
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/vortex_peer.py --smoke --vortex_src .vortex \
    --out $OUT --budget_s 240
  # 2. the run, timeout_s 600 (the YAML is checked against evo2_7b_base before anything runs):
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/vortex_peer.py --vortex_src .vortex \
    --out $OUT --budget_s 540
If the budget cuts points (the notes say "not run: time budget"), give each side a call of its
own on the same warm machine and merge the two JSONL files here:
  ... vortex_peer.py --side vortex --vortex_src .vortex --out $OUT --budget_s 540
  ... vortex_peer.py --side ours --vortex_src .vortex --out $OUT --budget_s 540
  python benchmarks/vortex_peer.py --report A/vortex_peer.jsonl,B/vortex_peer.jsonl --out DIR
Elsewhere:
  python benchmarks/vortex_peer.py --smoke --out DIR   # CPU plumbing check; vortex needs torch +
                                                       # CUDA, so that side is skipped with a note
  python benchmarks/vortex_peer.py --report A/vortex_peer.jsonl[,B/...] [--out DIR]
                                                       # redraw (and merge) the tables
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIDES = ("both", "vortex", "ours")  # the children of a run are --child --side vortex|ours_forward
GPU_DEFAULTS = dict(lengths=[8192, 32768, 131072], batches=[1, 16], prompt_len=8192, steps=64,
                    reps=5)
SMOKE_DEFAULTS = dict(lengths=[256], batches=[1, 2], prompt_len=64, steps=4, reps=2)
# The CPU shape of ``benchmarks/decode.py --small`` (our forward in --smoke uses the same).
OUR_SMALL = dict(d_model=256, num_layers=8, num_heads=2, mlp_hidden=512, se_groups=16,
                 mr_groups=16)
OUR_PRESET = "evo2_7b_base"
# The fields that make two configs the same network (compared before anything runs).
SHAPE_FIELDS = ("d_model", "num_layers", "layer_types", "vocab_size", "num_heads", "mlp_hidden",
                "se_groups", "mr_groups", "se_len", "mr_len", "featurizer_len", "li_state",
                "rope_base", "rope_scale")
DECODE_ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|")


class Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse's default adds the usage text)
    fail(message)


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _int_list(flag: str, text: str) -> list[int]:
  out = []
  for part in text.split(","):
    if not part.strip().isdigit() or int(part) <= 0:
      fail(f"{flag} {text!r}: {part.strip()!r} is not a positive integer (expected e.g. 8192,32768)")
    out.append(int(part))
  return out


def _override(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    fail(f"--set {text!r}: expected KEY=VALUE (a vortex config field, e.g. use_flashfft=False)")
  import yaml
  return key.strip(), yaml.safe_load(value)


def portable_command(argv: list[str]) -> str:
  """The command line as recorded in the result files: the output folder as ``OUT`` and an
  absolute vortex source or config by role, so a result names no folder of the machine it ran
  on."""
  roles = {"--out": lambda v: "OUT",
           "--vortex_src": lambda v: "VORTEX_SRC" if os.path.isabs(v) else v,
           "--config": lambda v: os.path.basename(v) if os.path.isabs(v) else v}
  words, rest = [], list(argv)
  while rest:
    word = rest.pop(0)
    flag, eq, value = word.partition("=")
    if flag in roles and (eq or rest):
      value = value if eq else rest.pop(0)
      words += [flag, roles[flag](value)]
    else:
      words.append(word)
  return "python benchmarks/vortex_peer.py " + " ".join(map(shlex.quote, words))


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = Parser(description=__doc__.split("\n")[0])
  p.add_argument("--vortex_src", default="", help="a vortex source checkout (holds vortex/)")
  p.add_argument("--config", default="", help="vortex YAML (default: VORTEX_SRC/configs/"
                 "evo2-7b-8k.yml)")
  p.add_argument("--side", default="both", help=f"one of {', '.join(SIDES)}")
  p.add_argument("--out", default=os.environ.get("OUT", ""))
  p.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget of the call")
  p.add_argument("--vortex_share", type=float, default=0.4, help="share of the budget for vortex")
  p.add_argument("--lengths", default="", help="forward lengths (default 8192,32768,131072)")
  p.add_argument("--batches", default="", help="decode batch sizes (default 1,16)")
  p.add_argument("--prompt_len", type=int, default=0, help="prompt before decoding (8192)")
  p.add_argument("--steps", type=int, default=0, help="decode steps per timed loop (64)")
  p.add_argument("--reps", type=int, default=0, help="timed loops per batch size (5)")
  p.add_argument("--li_impl", default="auto",
                 help="our LI implementation in the parallel forward (config li_impl)")
  p.add_argument("--attn", default="sdpa", help="vortex attention: sdpa (its use_flash_attn=False "
                 "path) or flash (needs flash_attn)")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE vortex config override")
  p.add_argument("--mem_fraction", type=float, default=0.9, help="XLA_PYTHON_CLIENT_MEM_FRACTION")
  p.add_argument("--profile_len", type=int, default=0, help="trace two of our forwards at this "
                 "length (one of --lengths): OUT/vortex_peer_ours_profile.md, kernel classes and "
                 "the HLO of the slowest fusions")
  p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU plumbing check)")
  p.add_argument("--report", default="", help="redraw the tables from vortex_peer.jsonl files "
                 "(a comma list merges the rows of separate calls)")
  p.add_argument("--command", default="", help=argparse.SUPPRESS)  # the parent's command line
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one side of a run
  a = p.parse_args(argv)
  if a.report:
    a.report = a.report.split(",")
    for path in a.report:
      if not os.path.isfile(path):
        fail(f"--report {path!r}: no such file")
    return a
  if a.side not in SIDES and not (a.child and a.side == "ours_forward"):
    fail(f"--side {a.side!r}: expected one of {', '.join(SIDES)}")
  if a.attn not in ("sdpa", "flash"):
    fail(f"--attn {a.attn!r}: expected sdpa or flash")
  from sh2_jax.config import LI_IMPLS
  if a.li_impl not in LI_IMPLS:
    fail(f"--li_impl {a.li_impl!r}: expected one of {', '.join(LI_IMPLS)}")
  for flag, value, lo, hi in (("--budget_s", a.budget_s, 0, float("inf")),
                              ("--vortex_share", a.vortex_share, 0, 1),
                              ("--mem_fraction", a.mem_fraction, 0, 1)):
    if not lo < value <= hi:
      fail(f"{flag} {value}: expected a number in ({lo}, {hi}]")
  defaults = SMOKE_DEFAULTS if a.smoke else GPU_DEFAULTS
  a.lengths = _int_list("--lengths", a.lengths) if a.lengths else defaults["lengths"]
  a.batches = _int_list("--batches", a.batches) if a.batches else defaults["batches"]
  for name in ("prompt_len", "steps", "reps"):
    value = getattr(a, name)
    if value < 0:
      fail(f"--{name} {value}: expected a positive integer")
    setattr(a, name, value or defaults[name])
  a.set = dict(_override(s) for s in a.set)
  if a.profile_len and a.profile_len not in a.lengths:
    fail(f"--profile_len {a.profile_len}: expected 0 or one of --lengths "
         f"{','.join(map(str, a.lengths))}")
  a.command = a.command or portable_command(argv)
  a.vortex_skip = ""  # why the vortex side cannot run here (--smoke only; otherwise an error)
  if a.vortex_src:  # also with --side ours: the shape check reads its YAML
    if not os.path.isfile(os.path.join(a.vortex_src, "vortex", "model", "model.py")):
      fail(f"--vortex_src {a.vortex_src!r}: no vortex/model/model.py there (expected a checkout "
           "of github.com/Zymrael/vortex)")
    a.config = a.config or os.path.join(a.vortex_src, "configs", "evo2-7b-8k.yml")
    if not os.path.isfile(a.config):
      fail(f"--config {a.config!r}: no such file (expected a vortex YAML, e.g. "
           "configs/evo2-7b-8k.yml)")
  elif a.config:
    fail("--config needs --vortex_src (the vortex source the config is for)")
  if a.side in ("both", "vortex"):
    if importlib.util.find_spec("torch") is None:
      a.vortex_skip = "torch is not installed here (the vortex side runs on the GPU machine)"
    elif not a.vortex_src:
      a.vortex_skip = "no --vortex_src given"
    elif a.attn == "flash" and importlib.util.find_spec("flash_attn_2_cuda") is None:
      fail("--attn flash: flash_attn (flash_attn_2_cuda) is not importable; use --attn sdpa")
    if a.vortex_skip and not a.smoke:
      fail(f"the vortex side cannot run: {a.vortex_skip}")
  return a


def base_fields(args) -> dict:
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              command=args.command)


def child_argv(args, side: str, budget_s: float, out: str) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--out", out,
          "--budget_s", f"{max(budget_s, 1.0):.0f}", "--lengths", ",".join(map(str, args.lengths)),
          "--batches", ",".join(map(str, args.batches)), "--prompt_len", str(args.prompt_len),
          "--steps", str(args.steps), "--reps", str(args.reps), "--attn", args.attn,
          "--li_impl", args.li_impl, "--profile_len", str(args.profile_len),
          "--command", args.command, "--child"]
  if args.vortex_src:
    argv += ["--vortex_src", os.path.abspath(args.vortex_src), "--config",
             os.path.abspath(args.config)]
  for key, value in args.set.items():
    argv += ["--set", f"{key}={json.dumps(value)}"]
  return argv + (["--smoke"] if args.smoke else [])


def stream(argv: list[str], env: dict, timeout_s: float, cwd: str = ROOT) -> tuple[int, list[str]]:
  """Run ``argv``, echo its output as it comes, kill it after ``timeout_s``; (rc, output lines)."""
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=cwd)
  timer = threading.Timer(timeout_s, proc.kill)
  timer.start()
  lines = []
  try:
    for line in proc.stdout:
      print(line, end="", flush=True)
      lines.append(line.rstrip("\n"))
  finally:
    timer.cancel()
  return proc.wait(), lines


def read_rows(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def jax_env(args) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(args.mem_fraction))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  return env


def ours_decode(args, base: dict, copy_Bps: float | None, timeout_s: float) -> list[dict]:
  """Our decoding through ``benchmarks/decode.py`` (its own process), its table read back."""
  argv = [sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"), "--preset", OUR_PRESET,
          "--prompt_len", str(args.prompt_len), "--batches", ",".join(map(str, args.batches)),
          "--steps", str(args.steps), "--reps", str(args.reps)] + (["--small"] if args.smoke else [])
  print("$", " ".join(map(shlex.quote, argv[1:])), flush=True)
  rc, lines = stream(argv, jax_env(args), timeout_s)
  param_gib = next((float(m.group(1)) for m in (re.search(r"parameters ([\d.]+) GiB", x)
                                                for x in lines) if m), None)
  device = next((x.split(";")[0].removeprefix("device ").strip() for x in lines
                 if x.startswith("device ")), None)
  rows, seen = [], set()
  for line in lines:
    m = DECODE_ROW.match(line)
    if not m:
      continue
    batch, prefill_s, step_ms, tok_s, gbs, cache_gib = m.groups()
    seen.add(int(batch))
    rows.append(dict(kind="decode", impl="sh2_jax", L=args.prompt_len, batch=int(batch),
                     ms=float(step_ms), tokens_per_s=float(tok_s), prefill_s=float(prefill_s),
                     gbs=float(gbs), cache_bytes=float(cache_gib) * 2**30,
                     param_bytes=None if param_gib is None else param_gib * 2**30,
                     pct_copy=100 * float(gbs) * 1e9 / copy_Bps if copy_Bps else None,
                     device=device, **base))
  note = f"decode.py exited {rc}: {lines[-1][:160] if lines else ''}" if rc else "not measured"
  for batch in args.batches:
    if batch not in seen:
      rows.append(dict(kind="decode", impl="sh2_jax", L=args.prompt_len, batch=batch, ms=None,
                       note=note, device=device, **base))
  return rows


def shape_check(args) -> dict:
  """The vortex YAML (with ``--set``) read by our converter's ``config_from_yaml`` against our
  preset, field by field; a difference is an error (the two would not be the same network)."""
  import yaml
  from sh2_jax.convert.vortex import config_from_yaml
  from sh2_jax.presets import get_preset
  with open(args.config) as fh:
    raw = dict(yaml.safe_load(fh), **args.set)
  try:
    theirs = config_from_yaml(raw)
  except (KeyError, ValueError) as e:
    fail(f"--config {args.config!r}: not a config our converter reads ({e})")
  ours = get_preset(OUR_PRESET)
  diff = {k: (getattr(theirs, k), getattr(ours, k)) for k in SHAPE_FIELDS
          if getattr(theirs, k) != getattr(ours, k)}
  if diff:
    fail(f"--config {args.config!r} is not the {OUR_PRESET} shape: " + "; ".join(
        f"{k} {v!r} vs ours {o!r}" for k, (v, o) in diff.items()))
  return {k: getattr(ours, k) for k in SHAPE_FIELDS if k != "layer_types"} | {
      "layout": "-".join(ours.layer_types)}


def run_both(args) -> None:
  """The parent: each side in its own process, then the merged JSONL and tables."""
  from benchmarks import common
  shape = shape_check(args) if args.config and not args.smoke else None
  out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="vortex_peer_"))
  os.makedirs(out, exist_ok=True)
  budget = common.Budget(args.budget_s)
  base = base_fields(args)
  rows: list[dict] = []
  if shape:
    print(f"shape: {os.path.basename(args.config)} is {OUR_PRESET} in every field of "
          f"{', '.join(SHAPE_FIELDS)}", flush=True)
    rows.append(dict(kind="shape", impl="both", vortex_config=os.path.basename(args.config),
                     preset=OUR_PRESET, fields=shape, **base))
  if args.side in ("both", "vortex"):
    if args.vortex_skip:
      print(f"skip: vortex side: {args.vortex_skip}", flush=True)
      rows.append(dict(kind="skipped", impl="vortex", note=args.vortex_skip, **base))
    else:
      share = args.vortex_share if args.side == "both" else 1.0
      child_budget = budget.left() * share - 30  # room for model build and teardown
      # vortex's logging module opens activations_debug.log in the working directory: a scratch one
      # one device: vortex spreads its layers over every GPU it sees
      env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES",
                                                                 "0").split(",")[0])
      rc, lines = stream(child_argv(args, "vortex", child_budget, out), env,
                         max(budget.left() * share, 30), cwd=tempfile.mkdtemp())
      rows += read_rows(os.path.join(out, "vortex_peer_vortex.jsonl"))
      if rc:
        rows.append(dict(kind="error", impl="vortex", note=f"exited {rc}: "
                         f"{lines[-1][:200] if lines else ''}", **base))
  if args.side in ("both", "ours"):
    rc, lines = stream(child_argv(args, "ours_forward", budget.left() * 0.5 - 20, out),
                       jax_env(args), max(budget.left() * 0.5, 30))
    ours = read_rows(os.path.join(out, "vortex_peer_ours_forward.jsonl"))
    if rc:
      ours.append(dict(kind="error", impl="sh2_jax", note=f"exited {rc}: "
                       f"{lines[-1][:200] if lines else ''}", **base))
    copy_Bps = next((r.get("copy_Bps") for r in ours if r["kind"] == "config"), None)
    rows += ours + ours_decode(args, base, copy_Bps, max(budget.left() - 5, 30))
  rec = common.Recorder(out, "vortex_peer")
  for r in rows:
    rec.add(**r)
  report(rows, out)


def ours_forward(args) -> None:
  """Our parallel forward (the jitted model call, logits out) at each length, B = 1."""
  import jax
  from flax import nnx
  from benchmarks import common
  from benchmarks import decode as our_decode
  from sh2_jax.presets import evo2_layer_idxs, get_preset
  overrides = dict(dtype="bfloat16", param_dtype="bfloat16", li_impl=args.li_impl)
  if args.smoke:
    overrides.update(OUR_SMALL, layer_idxs=evo2_layer_idxs(8, (3, 7)))
  cfg = get_preset(OUR_PRESET, **overrides)
  rec = common.Recorder(args.out, "vortex_peer_ours_forward")
  info = common.device_info()
  base = dict(base_fields(args), device=info["device"])
  t0 = time.perf_counter()
  model = our_decode.build(cfg)
  graphdef, state = nnx.split(model)
  param_bytes = our_decode.pytree_bytes(state)
  bw = common.copy_bandwidth(1 << 24 if args.smoke else 1 << 30)
  rec.add(kind="config", impl="sh2_jax", jax=info["jax"], preset=OUR_PRESET,
          dtype=cfg.dtype, param_dtype=cfg.param_dtype, conv_impl=cfg.conv_impl,
          li_impl=cfg.li_impl, attention_impl=cfg.attention_impl, param_bytes=param_bytes,
          init_s=round(time.perf_counter() - t0, 1), copy_Bps=bw, **base)
  print(f"sh2_jax on {info['device']}: JAX {info['jax']}; parameters {param_bytes / 2**30:.2f} "
        f"GiB; copy {bw / 1e12:.2f} TB/s", flush=True)
  fwd = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  budget = common.Budget(args.budget_s)
  last = None
  for length in args.lengths:
    row = dict(kind="forward", impl="sh2_jax", L=length, batch=1, **base)
    if last is not None and not budget.allows(last[1] * length / last[0]):
      rec.add(**row, ms=None, note="not run: time budget")
      continue
    t0 = time.perf_counter()
    try:
      tokens = jax.random.randint(jax.random.key(length), (1, length), 0, 256)
      compiled = fwd.lower(state, tokens).compile()  # once: the timing and the profile's HLO
      s = common.timeit(compiled, state, tokens)
      row.update(ms=1e3 * s, tokens_per_s=length / s)
    except Exception as e:  # an OOM is a table note
      row.update(ms=None, note=common.short_error(e))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    last = (length, row["wall_s"])
    rec.add(**row)
    print(f"sh2_jax forward L={length}: {row.get('ms')} ms ({row['wall_s']} s) "
          f"{row.get('note', '')}", flush=True)
    if length == args.profile_len and row.get("ms") is not None:
      profile_forward(compiled, state, tokens, length, args.out)


def profile_forward(compiled, state, tokens, length: int, out: str) -> None:
  """Two traced forwards: time per kernel class, top kernels, the HLO of the slowest fusions."""
  import jax
  from benchmarks.profiling import fusion_report, profile_summary
  label = f"sh2_jax forward ({OUR_PRESET}, random weights, bf16), L={length}, B=1"
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(2):
        jax.block_until_ready(compiled(state, tokens))
    text = (profile_summary(d, 2, label) + "\n"
            + fusion_report(compiled.as_text(), d, 2, top=16))
  print(text, flush=True)
  if out:
    with open(os.path.join(out, "vortex_peer_ours_profile.md"), "w") as f:
      f.write(text + "\n")


def vortex_side(args) -> None:
  from benchmarks import common, vortex_torch
  rec = common.Recorder(args.out, "vortex_peer_vortex")
  base = base_fields(args)
  if args.vortex_skip:
    print(f"skip: vortex side: {args.vortex_skip}", flush=True)
    rec.add(kind="skipped", impl="vortex", note=args.vortex_skip, **base)
    return
  vortex_torch.run(args, rec, base)


# ----------------------------------------------------------------------------- tables


def report(rows: list[dict], out_dir: str) -> str:
  from benchmarks import common

  def get(kind, impl, **key):  # merged calls: a measured row wins over a "not run" note
    found = [r for r in rows if r.get("kind") == kind and r.get("impl") == impl
             and all(r.get(k) == v for k, v in key.items())]
    return next((r for r in found if r.get("ms") is not None), found[0] if found else None)

  vcfg, ocfg, shape = get("config", "vortex"), get("config", "sh2_jax"), get("shape", "both")
  devices = sorted({r["device"] for r in rows if r.get("device")})
  dates = sorted({r["date"] for r in rows if r.get("date")})
  commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
  when = " to ".join(sorted({dates[0], dates[-1]})) if dates else "–"
  parts = [f"Card: {', '.join(devices) or '–'}; {when}. Command: "
           + "; ".join(f"`{c}`" for c in commands)]
  if shape:
    f = shape["fields"]
    parts.append(f"Shape ({shape['vortex_config']} = our {shape['preset']}, checked field by "
                 f"field): D = {f['d_model']}, {f['num_layers']} layers, MLP {f['mlp_hidden']}, "
                 f"{f['num_heads']} heads, SE/MR groups {f['se_groups']}/{f['mr_groups']}, "
                 f"taps {f['featurizer_len']}/{f['se_len']}/{f['mr_len']}, LI state "
                 f"{f['li_state']}, vocab {f['vocab_size']}; layout {f['layout']}.")
  if vcfg:
    dtypes = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in vcfg["param_bytes_by_dtype"].items())
    parts.append(f"vortex ({vcfg['vortex_config']}; torch {vcfg['torch']}, triton "
                 f"{vcfg['triton']}): overrides {vcfg['overrides']}; attention: "
                 f"{vcfg['attention']}; flash_attn importable: {vcfg['flash_attn_importable']} "
                 f"(import stub: {vcfg['flash_attn_stub']}); "
                 f"LI prefill {vcfg['prefill_style']}; parameters {dtypes}; eager PyTorch "
                 f"(no torch.compile, no CUDA graphs); D2D copy {vcfg['copy_Bps'] / 1e12:.2f} TB/s "
                 "(read + write).")
  if ocfg:
    parts.append(f"sh2_jax (preset {ocfg['preset']}; JAX {ocfg['jax']}): {ocfg['dtype']} compute, "
                 f"{ocfg['param_dtype']} parameters ({ocfg['param_bytes'] / 2**30:.2f} GiB), "
                 f"conv {ocfg['conv_impl']}, LI {ocfg['li_impl']}, attention "
                 f"{ocfg['attention_impl']}; elementwise copy {ocfg['copy_Bps'] / 1e12:.2f} TB/s.")

  def cell(r, key="ms", spec=None):
    if r is None:
      return "–"
    if r.get(key) is None:  # the note (OOM, budget) goes in the time column only
      return (r.get("note") or "–") if key == "ms" else "–"
    return common.fmt_ms(r[key] / 1e3) if spec is None else format(r[key], spec)

  def rate(r):
    return "–" if not r or r.get("gbs") is None else (
        f"{r['gbs']:.0f}" + (f" ({r['pct_copy']:.0f}%)" if r.get("pct_copy") else ""))

  def speedup(v, o):
    return f"{v['ms'] / o['ms']:.2f}x" if v and o and v.get("ms") and o.get("ms") else "–"

  lengths = sorted({r["L"] for r in rows if r.get("kind") == "forward"})
  if lengths:
    table = []
    for length in lengths:
      v, o = get("forward", "vortex", L=length), get("forward", "sh2_jax", L=length)
      table.append([f"{length // 1024}K" if length >= 1024 else str(length), cell(v),
                    cell(v, "tokens_per_s", ".0f"), cell(o), cell(o, "tokens_per_s", ".0f"),
                    speedup(v, o)])
    parts.append("**Parallel forward**, B = 1, logits out; median ms:\n\n" + common.markdown_table(
        ["L", "vortex ms", "vortex tokens/s", "sh2_jax ms", "sh2_jax tokens/s",
         "sh2_jax faster by"], table))
  batches = sorted({r["batch"] for r in rows if r.get("kind") == "decode"})
  if batches:
    prompt = next(r["L"] for r in rows if r.get("kind") == "decode")
    table = []
    for batch in batches:
      v, o = get("decode", "vortex", batch=batch), get("decode", "sh2_jax", batch=batch)
      table.append([batch, cell(v), cell(v, "tokens_per_s", ".0f"),
                    rate(v), cell(o), cell(o, "tokens_per_s", ".0f"), rate(o), speedup(v, o)])
    parts.append(f"**Cached decoding** after a {prompt}-token prompt; ms per step (median of "
                 "timed loops), GB/s = bytes per step / step time (vortex: parameters + its whole cache; "
                 "sh2_jax: parameters + KV cache up to the position + states), and its share of "
                 "that side's measured copy rate:\n\n" + common.markdown_table(
                     ["batch", "vortex ms/step", "vortex tokens/s", "vortex GB/s (% copy)",
                      "sh2_jax ms/step", "sh2_jax tokens/s", "sh2_jax GB/s (% copy)",
                      "sh2_jax faster by"], table))
  notes = [f"{r['impl']}: {r['note']}" for r in rows if r.get("kind") in ("skipped", "error")]
  if notes:
    parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes))
  text = "\n\n".join(parts)
  if out_dir:
    with open(os.path.join(out_dir, "vortex_peer.md"), "w") as fh:
      fh.write(text + "\n")
  print(text, flush=True)
  return text


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  if args.report:
    report([r for path in args.report for r in read_rows(path)], args.out)
  elif args.child:  # one side of a run, in its own process (see run_both)
    if not args.out:
      fail("--child needs --out")
    (vortex_side if args.side == "vortex" else ours_forward)(args)
  else:
    run_both(args)


if __name__ == "__main__":
  main(sys.argv[1:])
