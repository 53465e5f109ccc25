"""Decode throughput after a long prompt, and decoding-cache memory against all-attention.

  PYTHONPATH=. python benchmarks/decode.py                       # evo2_7b_base shape, bf16, H100
  PYTHONPATH=. python benchmarks/decode.py --small               # CPU smoke run

Random weights (bf16 parameters and compute) at the preset's shape. For each batch size:
prefill a prompt of --prompt_len tokens (timed once after a warm-up compile), then time
compiled loops of --steps greedy decode steps (the cache is donated, so it is updated in place);
tokens/s = batch * steps / median loop time. Bytes per step = parameters + the cache (every
decode step streams all weights and the whole fixed-size cache), giving the achieved bandwidth.
Cache memory comes from the cache pytrees: the hybrid model's real cache, and the cache of the
same shape with every layer MHA (shapes only).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sh2_jax.config import ModelConfig
from sh2_jax.inference import decode_step, prefill
from sh2_jax.inference.cache import cache_bytes
from sh2_jax.model import StripedHyena
from sh2_jax.presets import evo2_layer_idxs, get_preset

flags.DEFINE_string("preset", "evo2_7b_base", "model shape")
flags.DEFINE_integer("prompt_len", 8192, "prompt tokens before decoding")
flags.DEFINE_list("batches", ["1", "16"], "batch sizes")
flags.DEFINE_integer("steps", 64, "decode steps per timed loop")
flags.DEFINE_integer("reps", 5, "timed loops per batch size (after one warm-up loop)")
flags.DEFINE_bool("small", False, "a small shape for a CPU smoke run")
flags.DEFINE_integer("prefill_rows", 4, "rows per prefill call (the 8K prefill's activations "
                     "at 16 rows exceed one H100)")
flags.DEFINE_string("conv_impl", "xla", "SE/MR implementation of the prefill (decode needs none)")
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
  leaves, treedef = jax.tree.flatten(abstract)
  fill = jax.jit(lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype),
                 static_argnums=(1, 2))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return nnx.merge(graphdef, jax.tree.unflatten(
      treedef, [fill(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def main(argv):
  del argv
  overrides = dict(dtype="bfloat16", param_dtype="bfloat16", conv_impl=FLAGS.conv_impl)
  if FLAGS.small:
    overrides.update(d_model=256, num_layers=8, num_heads=2, mlp_hidden=512, se_groups=16,
                     mr_groups=16, layer_idxs=evo2_layer_idxs(8, (3, 7)))
  cfg = get_preset(FLAGS.preset, **overrides)
  mha_cfg = dataclasses.replace(cfg, layout="MHA", layer_idxs=())
  prompt_len, steps = FLAGS.prompt_len, FLAGS.steps
  max_len = prompt_len + steps * (FLAGS.reps + 1)
  device = jax.devices()[0].device_kind
  print(f"device {device}; preset {FLAGS.preset}: D={cfg.d_model}, {cfg.num_layers} layers "
        f"{'-'.join(cfg.layer_types[:7])}..., dtype {cfg.dtype}; prompt {prompt_len}, "
        f"{steps} steps x {FLAGS.reps} loops", flush=True)
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
  for batch in [int(b) for b in FLAGS.batches]:
    rng = np.random.default_rng(batch)
    tokens = jnp.asarray(rng.integers(0, 256, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    # Rows are independent: prefill them in groups that fit, then stack the caches.
    rows_per = max(r for r in range(1, min(batch, FLAGS.prefill_rows) + 1) if batch % r == 0)
    t0 = time.perf_counter()
    sync(run_prefill(graphdef, state, tokens[:rows_per], lengths[:rows_per]))
    compile_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = [sync(run_prefill(graphdef, state, tokens[i:i + rows_per], lengths[i:i + rows_per]))
             for i in range(0, batch, rows_per)]
    prefill_s = time.perf_counter() - t0
    logits, cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
    del parts
    peak = jax.devices()[0].memory_stats() or {}
    print(f"batch {batch}: prefill in groups of {rows_per} rows; peak device memory "
          f"{peak.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB", flush=True)
    hybrid_cache = pytree_bytes(cache)
    assert hybrid_cache == cache_bytes(cfg, batch, max_len)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    t0 = time.perf_counter()
    cache, tok = sync(run_decode(graphdef, state, cache, tok))
    compile_decode = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.reps):
      t0 = time.perf_counter()
      cache, tok = sync(run_decode(graphdef, state, cache, tok))
      times.append(time.perf_counter() - t0)
    assert bool(jnp.all(jnp.isfinite(logits)))
    step_s = statistics.median(times) / steps
    row = dict(batch=batch, prefill_s=prefill_s, step_ms=1e3 * step_s,
               tok_s=batch / step_s, gbs=(param_bytes + hybrid_cache) / step_s / 1e9,
               cache_gib=hybrid_cache / 2**30,
               mha_cache_gib=cache_bytes(mha_cfg, batch, max_len) / 2**30,
               compile_s=compile_prefill + compile_decode)
    rows.append(row)
    print(f"batch {batch}: prefill compile+run {compile_prefill:.1f}s, decode compile+warm-up "
          f"{compile_decode:.1f}s; step times {[round(1e3 * t / steps, 3) for t in times]} ms",
          flush=True)
    del cache

  print(f"\n| batch | prefill {prompt_len} (s, all rows) | decode ms/step | tokens/s | GB/s (params + "
        f"cache) | cache GiB (hybrid) | KV GiB (all-MHA) | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['prefill_s']:.3f} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | "
          f"{r['gbs']:.0f} | {r['cache_gib']:.3f} | {r['mha_cache_gib']:.3f} | "
          f"{r['mha_cache_gib'] / r['cache_gib']:.1f}x |")
  print(f"\ncache sizes for {max_len} positions; parameters {param_bytes / 2**30:.2f} GiB.")


if __name__ == "__main__":
  app.run(main)
