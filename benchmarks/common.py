"""Shared helpers of the benchmark scripts: timing, the two ceilings of the card, budgets, tables.

Timing (``timeit``): compile and the first call are excluded (warm-up), then ``samples`` samples
of ``reps`` back-to-back asynchronous calls each, closed by ``jax.block_until_ready``; the result
is the median seconds per call. ``reps`` is chosen so that a sample lasts about ``target_s``
(launch gaps of sub-millisecond ops are amortised, as in a model where the next op is queued).

Ceilings (``copy_bandwidth``, ``gemm_rate``): measured once per process on the card in use and
reported next to every table, so "% of roofline" and MFU are against this card, not a datasheet.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def timeit(fn, *args, target_s: float = 0.03, samples: int = 7, max_s: float = 6.0) -> float:
  """Median seconds per call of ``fn(*args)`` (see the module docstring). Long calls take fewer
  samples (at least 3) so that one point never costs much more than ``max_s``."""
  jax.block_until_ready(fn(*args))  # compile + first call
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  est = max(time.perf_counter() - t0, 1e-6)
  reps = int(min(100, max(1, target_s / est)))
  samples = int(max(3, min(samples, max_s / (est * reps))))
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Bytes per second of an elementwise pass over ``nbytes`` of bf16 (bytes read + written)."""
  x = jax.random.normal(jax.random.key(7), (nbytes // 2,), jnp.bfloat16)
  t = timeit(jax.jit(lambda a: a * 1.5 + 1), x, target_s=0.05)
  return 2 * x.nbytes / t


def read_bandwidth(nbytes: int = 1 << 30) -> float:
  """Bytes per second of reading ``nbytes`` of bf16 once (a column sum: the output is one row),
  the ceiling of a step that reads much and writes little, as a decode step does."""
  x = jax.random.normal(jax.random.key(8), (nbytes // 2 // 8192, 8192), jnp.bfloat16)
  t = timeit(jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32)), x, target_s=0.05)
  return x.nbytes / t


def gemv_bandwidth(d: int, batch: int = 1, nbytes: int = 1 << 30) -> float:
  """Bytes per second (weights, input and output) of XLA's [batch, d] x [d, n] bf16 product
  over ``nbytes`` of weights: the rate a decode step's projections get from the library."""
  n = max(1, nbytes // 2 // d)
  kx, kw = jax.random.split(jax.random.key(9))
  x = jax.random.normal(kx, (batch, d), jnp.bfloat16)
  w = jax.random.normal(kw, (d, n), jnp.bfloat16)
  t = timeit(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32
                                          ).astype(jnp.bfloat16)), x, w, target_s=0.05)
  return (w.nbytes + x.nbytes + batch * n * 2) / t


def gemm_rate(n: int = 8192) -> float:
  """FLOP/s of a bf16 n x n x n matrix product through XLA (random data, f32 accumulation)."""
  ka, kb = jax.random.split(jax.random.key(11))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  t = timeit(jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32
                                          ).astype(jnp.bfloat16)), a, b, target_s=0.1)
  return 2 * n ** 3 / t


def is_oom(err: BaseException) -> bool:
  msg = str(err)
  return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or "OOM" in msg


def short_error(err: BaseException, limit: int = 160) -> str:
  if is_oom(err):
    return "OOM"
  first = str(err).strip().splitlines()[0] if str(err).strip() else ""
  return f"{type(err).__name__}: {first[:limit]}"


class Budget:
  """Wall-clock budget of a run: points whose predicted cost would overrun it are skipped with
  a note, so a call with a hard time limit still ends with its tables printed."""

  def __init__(self, seconds: float):
    self.t0 = time.perf_counter()
    self.seconds = seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.t0)

  def allows(self, predicted_s: float) -> bool:
    return self.left() > predicted_s


def device_info() -> dict:
  dev = jax.devices()[0]
  return {"device": getattr(dev, "device_kind", str(dev)), "count": jax.device_count(),
          "backend": jax.default_backend(), "jax": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "host_cpu": platform.machine()}


def markdown_table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


class Recorder:
  """Appends one JSON object per measured point to ``out_dir/name.jsonl`` as it is measured
  (a run cut short by its time limit keeps what it measured)."""

  def __init__(self, out_dir: str, name: str):
    self.path = os.path.join(out_dir, f"{name}.jsonl") if out_dir else None
    if self.path:
      os.makedirs(out_dir, exist_ok=True)
      open(self.path, "w").close()
    self.rows: list[dict] = []

  def add(self, **row) -> dict:
    self.rows.append(row)
    if self.path:
      with open(self.path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def fmt_ms(seconds: float | None) -> str:
  if seconds is None:
    return "–"
  ms = seconds * 1e3
  return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"
