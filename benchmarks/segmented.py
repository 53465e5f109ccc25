"""Peak memory and time of the segmented forward (sh2_jax.inference.segmented).

  python benchmarks/segmented.py --preset=evo2_7b_base --length=1048576 --segments=65536 --context=2

``--context N`` shards the KV cache by position over N devices (a mesh of the first N; weights
and the Hyena caches replicated); ``--context 1`` runs on one device without a mesh.

Random weights (bf16 parameters and compute): memory and speed only. Prints one row per run:
tokens, segment, seconds (after a warm-up segment pass of the same shapes), tokens/s, peak
device memory, the KV cache's share of it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sh2_jax.inference.cache import cache_bytes
from sh2_jax.inference.segmented import _loglik_head, segmented_apply
from sh2_jax.model import StripedHyena
from sh2_jax.presets import get_preset

flags.DEFINE_string("preset", "evo2_7b_base", "model preset")
flags.DEFINE_integer("length", 1 << 20, "tokens")
flags.DEFINE_list("segments", ["65536"], "segment lengths to time")
flags.DEFINE_integer("num_layers", 0, "override the layer count (0: the preset's)")
flags.DEFINE_integer("context", 1, "devices to shard the KV cache over (1: no mesh)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  over = dict(dtype="bfloat16", param_dtype="bfloat16")
  if FLAGS.num_layers:
    over["num_layers"] = FLAGS.num_layers
  cfg = get_preset(FLAGS.preset, **over)
  model = StripedHyena(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(65, 85, (1, FLAGS.length)).astype(np.int32)
  n = FLAGS.context
  devs = jax.devices()[:n]
  if len(devs) < n:
    raise app.UsageError(f"--context {n} needs {n} devices; {jax.device_count()} present")
  mesh = None if n == 1 else jax.make_mesh((n,), ("context",), devices=devs)
  print(f"device {devs[0].device_kind} x{n}; {FLAGS.preset} ({cfg.num_layers} layers, width "
        f"{cfg.d_model}, conv_impl {cfg.conv_impl}, li_impl {cfg.li_impl}); "
        f"KV+state cache {cache_bytes(cfg, 1, FLAGS.length) / 2**30:.1f} GiB in all")
  rows = []
  for seg in map(int, FLAGS.segments):
    warm = tokens[:, : 2 * seg]  # compiles both segment shapes' step
    segmented_apply(model, warm, seg, head=_loglik_head, max_len=FLAGS.length, mesh=mesh)
    t0 = time.perf_counter()
    outs, cache = segmented_apply(model, tokens, seg, head=_loglik_head, mesh=mesh)
    jax.block_until_ready(cache)
    dt = time.perf_counter() - t0
    del cache
    ll = np.concatenate(outs, axis=1)[:, :-1]
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devs) / 2**30
    rows.append((FLAGS.length, seg, n, dt, FLAGS.length / dt, peak,
                 bool(np.isfinite(ll).all())))
  print("| tokens | segment | devices | seconds | tokens/s | peak GiB per device | finite |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]:,} | {r[1]:,} | {r[2]} | {r[3]:.1f} | {r[4]:,.0f} | {r[5]:.1f} | {r[6]} |")


if __name__ == "__main__":
  app.run(main)
