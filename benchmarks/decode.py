"""Decode throughput after a long prompt against the bytes a step must read; cache memory against
all-attention; the kernels a step launches; XLA flag sets compared in one call.

  PYTHONPATH=. python benchmarks/decode.py                       # evo2_7b_base shape, bf16
  PYTHONPATH=. python benchmarks/decode.py --small               # CPU smoke run
  PYTHONPATH=. python benchmarks/decode.py --batches 1 --profile DIR     # + trace, kernel table
  PYTHONPATH=. python benchmarks/decode.py --batches 1 --noprefill \\
      --xla_flag_sets ';--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL'

Random weights (bf16 parameters and compute; ``--param_dtype float32`` stores them as float32,
the trainer's and checkpoints' dtype) at the preset's shape. For each batch size:
prefill a prompt of --prompt_len tokens (timed once after a warm-up compile; ``--noprefill``
fills the cache with random values at that position instead: the same step, no prefill
compile), then time compiled loops of --steps greedy decode steps (the cache is donated, so it
is updated in place); ms/token = median loop time / steps, tokens/s = batch / that.

Bytes a step must read (``inference.cache.decode_read_bytes``, at the loops' mean position):
every parameter at its stored dtype, each attention layer's keys and values up to the position,
the Hyena layers' histories and LI states; the achieved rate is those bytes per step time,
reported against three ceilings measured in the same process: the elementwise copy rate
(``common.copy_bandwidth``), the read rate (``common.read_bandwidth``: a step reads much and
writes little) and XLA's own GEMV rate at the model's width and the row's batch
(``common.gemv_bandwidth``: what the projections can get from the library). Kernels per step:
the launch-worthy instructions (fusions, custom calls, copies, ...) of the compiled loop's body,
from the optimized HLO. ``--profile DIR`` traces one timed loop
(jax.profiler) and prints device time and kernels per step by kernel class
(``benchmarks/profiling.py``); DIR gets the trace, the table and the loop's optimized HLO.
``--xla_flag_sets`` runs this benchmark once per set (``;``-separated, each a space-separated
list of XLA flags added to XLA_FLAGS; an empty set is the default) in its own process and prints
ms/token per set: the parent never touches the device.
Cache memory comes from the cache pytrees: the hybrid model's real cache, and the cache of the
same shape with every layer MHA (shapes only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, profiling  # noqa: E402
from sh2_jax.cli.launch import parse_flags  # noqa: E402
from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.inference import decode_step, prefill  # noqa: E402
from sh2_jax.inference.cache import cache_bytes, decode_read_bytes, init_cache  # noqa: E402
from sh2_jax.model import StripedHyena  # noqa: E402
from sh2_jax.presets import evo2_layer_idxs, get_preset  # noqa: E402

flags.DEFINE_string("preset", "evo2_7b_base", "model shape")
flags.DEFINE_integer("prompt_len", 8192, "prompt tokens before decoding")
flags.DEFINE_list("batches", ["1", "16"], "batch sizes")
flags.DEFINE_integer("steps", 64, "decode steps per timed loop")
flags.DEFINE_integer("reps", 5, "timed loops per batch size (after one warm-up loop)")
flags.DEFINE_bool("small", False, "a small shape for a CPU smoke run")
flags.DEFINE_bool("prefill", True, "prefill the prompt (--noprefill: a random cache at "
                  "--prompt_len, same decode step, no prefill compile)")
flags.DEFINE_integer("prefill_rows", 4, "rows per prefill call (the 8K prefill's activations "
                     "at 16 rows exceed one H100)")
flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"], "stored parameter dtype "
                  "(compute is bf16): float32 shows whether the loop re-reads f32 weights")
flags.DEFINE_string("conv_impl", "xla", "SE/MR implementation of the prefill (decode needs none)")
flags.DEFINE_string("decode_attention_impl", "auto", "the model's decode_attention_impl: auto | "
                    "xla | cudnn (one query over the KV cache)")
flags.DEFINE_string("profile", "", "trace one timed loop per batch size into this folder and "
                    "print device time and kernels per step by kernel class")
flags.DEFINE_string("xla_flag_sets", None, "';'-separated XLA flag sets (each space-separated "
                    "--xla_... flags; empty = default): one child process per set, ms/token each")
flags.DEFINE_integer("child_timeout_s", 300, "with --xla_flag_sets: seconds each child may run")
flags.DEFINE_bool("json_rows", False, "also print each batch's row as one 'DECODE_JSON {...}' line")
FLAGS = flags.FLAGS

def sync(tree):
  jax.block_until_ready(tree)
  return tree


def pytree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def build(cfg: ModelConfig):
  """Random weights (normal, std 0.02) without compiling the whole initialiser: abstract model,
  then one small compiled fill per distinct shape."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: StripedHyena(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, random_like(abstract, 0))


def random_like(tree, seed: int):
  """Arrays of the tree's shapes and dtypes, normal with std 0.02 (one compiled fill per shape)."""
  leaves, treedef = jax.tree.flatten(tree)
  fill = jax.jit(lambda key, shape, dtype: (0.02 * jax.random.normal(key, shape, jnp.float32)
                                            ).astype(dtype), static_argnums=(1, 2))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [fill(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def parse_flag_sets(text: str) -> list[str]:
  """``'a;b c'`` -> ['a', 'b c']; every token must be an XLA flag (``--xla_...``)."""
  sets = [s.strip() for s in text.split(";")]
  for s in sets:
    for tok in s.split():
      if not tok.startswith("--xla_"):
        raise ValueError(f"--xla_flag_sets entry {tok!r} is not an XLA flag; expected flags like "
                         f"--xla_gpu_enable_command_buffer=... separated by spaces, sets by ';'")
  return sets


def check_flags() -> list[int]:
  try:
    batches = [int(b) for b in FLAGS.batches]
  except ValueError:
    raise ValueError(f"--batches {','.join(FLAGS.batches)!r} must be positive integers") from None
  for b in batches:
    if b < 1:
      raise ValueError(f"--batches entry {b} must be a positive integer")
  for name in ("prompt_len", "steps", "reps", "prefill_rows", "child_timeout_s"):
    if getattr(FLAGS, name) < 1:
      raise ValueError(f"--{name} {getattr(FLAGS, name)} must be a positive integer")
  if FLAGS.xla_flag_sets is not None:
    parse_flag_sets(FLAGS.xla_flag_sets)
    if FLAGS.profile:
      raise ValueError("--profile and --xla_flag_sets do not go together; profile one set")
  from sh2_jax import dispatch
  dispatch.resolve_decode_attention_impl(FLAGS.decode_attention_impl, "bfloat16")
  if FLAGS.profile and os.path.exists(FLAGS.profile) and not os.path.isdir(FLAGS.profile):
    raise ValueError(f"--profile {FLAGS.profile!r} exists and is not a folder")
  return batches


def child_args(argv: list[str]) -> list[str]:
  """The command line without ``--xla_flag_sets`` (either ``=VALUE`` or a separate value)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--xla_flag_sets":
      skip = True
    elif not a.startswith("--xla_flag_sets="):
      out.append(a)
  return out


def sweep() -> None:
  """One child process per XLA flag set (this script without --xla_flag_sets), its rows read
  back from its DECODE_JSON lines; a table of ms/token per set and batch."""
  sets = parse_flag_sets(FLAGS.xla_flag_sets)
  args = child_args(sys.argv[1:])
  rows = []
  base_flags = os.environ.get("XLA_FLAGS", "")
  for s in sets:
    env = dict(os.environ, XLA_FLAGS=f"{base_flags} {s}".strip())
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--json_rows"]
    print(f"\n## XLA flags: {s or '(default)'}\n$ XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} "
          f"{' '.join(map(shlex.quote, cmd[1:]))}", flush=True)
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=FLAGS.child_timeout_s)
    except subprocess.TimeoutExpired as err:
      out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (
          err.stdout or "")
      proc = subprocess.CompletedProcess(cmd, 124, out, f"timed out after "
                                         f"{FLAGS.child_timeout_s} s")
    out = proc.stdout.splitlines()
    for line in out:
      if not line.startswith("DECODE_JSON "):
        print("  " + line, flush=True)
    got = [json.loads(line.removeprefix("DECODE_JSON ")) for line in out
           if line.startswith("DECODE_JSON ")]
    if proc.returncode:
      tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      print(f"  exited {proc.returncode}: {tail[:300]}", flush=True)
      rows.append(dict(flags=s, batch=None, note=f"exit {proc.returncode}: {tail[:80]}"))
    for r in got:
      rows.append(dict(flags=s, **r))
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
  print("\n| XLA flags | batch | ms/token | tokens/s | must-read GB/s | % of copy rate | "
        "kernels/step (HLO) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    name = f"`{r['flags']}`" if r["flags"] else "(default)"
    if r.get("batch") is None:
      print(f"| {name} | – | {r['note']} | | | | |")
      continue
    print(f"| {name} | {r['batch']} | {r['step_ms']:.3f} | {r['tok_s']:.0f} | {r['gbs']:.0f} | "
          f"{r['pct_copy']:.1f}% | {r['kernels']} |")


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # JAX's INFO lines (backends it looked for) stay out
  try:
    batches = check_flags()
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.xla_flag_sets is not None:
    return sweep()
  overrides = dict(dtype="bfloat16", param_dtype=FLAGS.param_dtype, conv_impl=FLAGS.conv_impl,
                   decode_attention_impl=FLAGS.decode_attention_impl)
  if FLAGS.small:
    overrides.update(d_model=256, num_layers=8, num_heads=2, mlp_hidden=512, se_groups=16,
                     mr_groups=16, layer_idxs=evo2_layer_idxs(8, (3, 7)))
  cfg = get_preset(FLAGS.preset, **overrides)
  mha_cfg = dataclasses.replace(cfg, layout="MHA", layer_idxs=())
  prompt_len, steps = FLAGS.prompt_len, FLAGS.steps
  max_len = prompt_len + steps * (FLAGS.reps + 1 + (1 if FLAGS.profile else 0))
  device = jax.devices()[0].device_kind
  print(f"device {device}; preset {FLAGS.preset}: D={cfg.d_model}, {cfg.num_layers} layers "
        f"{'-'.join(cfg.layer_types[:7])}..., dtype {cfg.dtype}; prompt {prompt_len}, "
        f"{steps} steps x {FLAGS.reps} loops; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  t0 = time.perf_counter()
  ceiling_bytes = 1 << 24 if FLAGS.small else 1 << 30
  copy_Bps = common.copy_bandwidth(ceiling_bytes)
  read_Bps = common.read_bandwidth(ceiling_bytes)
  print(f"elementwise copy rate {copy_Bps / 1e9:.0f} GB/s, read rate {read_Bps / 1e9:.0f} GB/s "
        f"({time.perf_counter() - t0:.1f}s)", flush=True)
  t0 = time.perf_counter()
  model = sync(build(cfg))
  graphdef, state = nnx.split(model)
  param_bytes = pytree_bytes(state)
  print(f"init {time.perf_counter() - t0:.1f}s; parameters {param_bytes / 2**30:.2f} GiB",
        flush=True)

  @functools.partial(jax.jit, static_argnums=(0,))
  def run_prefill(graphdef, state, tokens, lengths):
    return prefill(nnx.merge(graphdef, state), tokens, lengths, max_len)

  @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
  def run_decode(graphdef, state, cache, tok):
    model = nnx.merge(graphdef, state)

    def body(_, carry):
      cache, tok = carry
      logits, cache = decode_step(model, cache, tok)
      return cache, jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, tok))

  rows = []
  for batch in batches:
    rng = np.random.default_rng(batch)
    prefill_s = compile_prefill = None
    if FLAGS.prefill:
      tokens = jnp.asarray(rng.integers(0, 256, (batch, prompt_len)), jnp.int32)
      lengths = jnp.full((batch,), prompt_len, jnp.int32)
      # Rows are independent: prefill them in groups that fit, then stack the caches.
      rows_per = max(r for r in range(1, min(batch, FLAGS.prefill_rows) + 1) if batch % r == 0)
      t0 = time.perf_counter()
      sync(run_prefill(graphdef, state, tokens[:rows_per], lengths[:rows_per]))
      compile_prefill = time.perf_counter() - t0
      t0 = time.perf_counter()
      parts = [sync(run_prefill(graphdef, state, tokens[i:i + rows_per],
                                lengths[i:i + rows_per])) for i in range(0, batch, rows_per)]
      prefill_s = time.perf_counter() - t0
      logits, cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
      del parts
      assert bool(jnp.all(jnp.isfinite(logits)))
      tok = jnp.argmax(logits, -1).astype(jnp.int32)
      how = f"prefill in groups of {rows_per} rows"
    else:
      empty = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
      cache = sync(random_like(empty, batch)._replace(
          lengths=jnp.full((batch,), prompt_len, jnp.int32)))
      tok = jnp.asarray(rng.integers(0, 256, (batch,)), jnp.int32)
      how = "random cache (no prefill)"
    peak = jax.devices()[0].memory_stats() or {}
    print(f"batch {batch}: {how}; peak device memory "
          f"{peak.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB", flush=True)
    hybrid_cache = pytree_bytes(cache)
    assert hybrid_cache == cache_bytes(cfg, batch, max_len)
    t0 = time.perf_counter()
    compiled = run_decode.lower(graphdef, state, cache, tok).compile()
    kernels = profiling.hlo_kernels(compiled.as_text())
    cache, tok = sync(compiled(state, cache, tok))
    compile_decode = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.reps):
      t0 = time.perf_counter()
      cache, tok = sync(compiled(state, cache, tok))
      times.append(time.perf_counter() - t0)
    profile = None
    if FLAGS.profile:
      where = os.path.join(FLAGS.profile, f"batch{batch}")
      os.makedirs(where, exist_ok=True)
      with open(os.path.join(where, "decode_loop.hlo.txt"), "w") as fh:
        fh.write(compiled.as_text())
      t0 = time.perf_counter()
      with jax.profiler.trace(where):
        cache, tok = sync(compiled(state, cache, tok))
      traced_ms = 1e3 * (time.perf_counter() - t0) / steps
      profile = profiling.profile_summary(
          where, steps, f"decode, batch {batch}, {FLAGS.preset}, position ~{prompt_len}; "
          f"traced loop {traced_ms:.3f} ms/step")
    # The timed loops ran from prompt_len (+ one warm-up loop) on: their mean position.
    position = prompt_len + steps + (FLAGS.reps * steps) // 2
    need = decode_read_bytes(cfg, batch, position, max_len)
    need_total = sum(need.values())
    step_s = statistics.median(times) / steps
    gemv_Bps = common.gemv_bandwidth(cfg.d_model, batch, ceiling_bytes)
    row = dict(batch=batch, decode_attention_impl=FLAGS.decode_attention_impl,
               prefill_s=prefill_s, step_ms=1e3 * step_s, tok_s=batch / step_s,
               gbs=need_total / step_s / 1e9, pct_copy=100 * need_total / step_s / copy_Bps,
               floor_ms=1e3 * need_total / copy_Bps,
               read_gb={k: v / 1e9 for k, v in need.items()},
               cache_gib=hybrid_cache / 2**30,
               mha_cache_gib=cache_bytes(mha_cfg, batch, max_len) / 2**30,
               kernels=profiling.kernel_total(kernels), kernel_ops=dict(kernels.most_common()),
               compile_s=(compile_prefill or 0) + compile_decode, copy_gbs=copy_Bps / 1e9,
               read_gbs=read_Bps / 1e9, gemv_gbs=gemv_Bps / 1e9,
               pct_read=100 * need_total / step_s / read_Bps,
               pct_gemv=100 * need_total / step_s / gemv_Bps)
    rows.append(row)
    print(f"batch {batch}: prefill compile+run {compile_prefill or 0:.1f}s, decode compile+"
          f"warm-up {compile_decode:.1f}s; step times {[round(1e3 * t / steps, 3) for t in times]}"
          f" ms; kernels per step (compiled HLO) {row['kernels']}: {dict(kernels.most_common())}",
          flush=True)
    if profile:
      print("\n" + profile + "\n", flush=True)
      with open(os.path.join(FLAGS.profile, f"decode_profile_batch{batch}.md"), "w") as fh:
        fh.write(profile + "\n")
    if FLAGS.json_rows:
      print("DECODE_JSON " + json.dumps(row), flush=True)
    del cache

  print(f"\n| batch | prefill {prompt_len} (s, all rows) | decode ms/token | tokens/s | GB/s "
        f"(must-read) | cache GiB (hybrid) | KV GiB (all-MHA) | ratio | must-read GB (params "
        f"/ KV / states) | % of copy rate | floor ms | kernels/step | % of read rate | "
        f"% of GEMV rate (GB/s) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    g = r["read_gb"]
    prefill_col = "–" if r["prefill_s"] is None else f"{r['prefill_s']:.3f}"
    print(f"| {r['batch']} | {prefill_col} | {r['step_ms']:.3f} | {r['tok_s']:.0f} | "
          f"{r['gbs']:.0f} | {r['cache_gib']:.3f} | {r['mha_cache_gib']:.3f} | "
          f"{r['mha_cache_gib'] / r['cache_gib']:.1f}x | {sum(g.values()):.3f} ({g['params']:.3f}"
          f" / {g['kv']:.3f} / {g['states']:.3f}) | {r['pct_copy']:.1f}% | {r['floor_ms']:.3f} | "
          f"{r['kernels']} | {r['pct_read']:.1f}% | {r['pct_gemv']:.1f}% ({r['gemv_gbs']:.0f}) |")
  print(f"\ncache sizes for {max_len} positions; parameters {param_bytes / 2**30:.2f} GiB; "
        f"elementwise copy rate {copy_Bps / 1e9:.0f} GB/s, read rate (a column sum) "
        f"{read_Bps / 1e9:.0f} GB/s, GEMV rate (XLA's [batch, {cfg.d_model}] x [{cfg.d_model}, n] "
        f"product over {ceiling_bytes / 2**30:g} GiB of weights, per batch), all in this process;"
        f" floor = must-read bytes / copy rate.")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)  # absl's flag errors as one ``error:`` line, exit 2
