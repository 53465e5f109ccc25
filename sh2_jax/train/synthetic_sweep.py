"""Train small models of one layout on several synthetic tasks at once, with an equal budget.

The trainer's own ``train_step`` (weighted loss = loss on the answer tokens) and optimizer
(``make_optimizer``) do the work; this module only batches it: the ``T`` (task, level) problems
of a sweep get ``T`` independent copies of the same model (same initialisation), trained side by
side with ``jax.vmap`` inside a ``lax.scan`` of steps, so a layout compiles once for all tasks.

Problems of different lengths share one compiled step by right-padding every example to the
longest length with PAD and weight 0: the models are causal, so predictions at the real
positions of a short example do not depend on the padding — a short problem padded is exactly
the short problem.

Learning rates: AdamW's update is linear in the learning rate (decoupled weight decay
included) and its moments do not depend on it, so ``params + r * (step(params) - params)`` is
exactly the trainer's step at ``r`` times the learning rate. That gives two things without
recompiling: every problem is trained once per entry of ``lr_scales`` (more vmapped copies), and
the trainer's schedule (``optim.learning_rate_schedule``, over its peak) is fed in as per-step
factors, so one compiled step serves any number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
import multiprocessing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax.config import ModelConfig
from sh2_jax.model import StripedHyena
from sh2_jax.synthetic.metrics import accuracy_counts, summarize
from sh2_jax.synthetic.tasks import TaskSpec
from sh2_jax.tokenizer import PAD_ID
from sh2_jax.train.optim import learning_rate_schedule, make_optimizer
from sh2_jax.train.step import train_step

LAYOUTS = ("SE", "MR", "LI", "MHA", "SE-MR-LI-MHA", "SE-SE-LI")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """Model size and training budget shared by every layout and task of a sweep."""
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 2
  mlp_hidden: int = 128
  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 2e-3
  warmup_frac: float = 0.1  # linear warmup over this fraction of the steps, then cosine
  min_lr_ratio: float = 0.1
  b2: float = 0.98
  weight_decay: float = 0.1
  n_train: int = 2048  # examples per problem in the training pool (batches sample it)
  n_eval: int = 256
  seed: int = 0
  # SE/MR filters and LI by FFT: the reference paths, fast on CPU, and they compose with vmap
  # (the Pallas kernels are not needed at these sizes).
  conv_impl: str = "fft"
  steps_per_call: int = 100  # steps fused into one lax.scan; steps is a multiple of it
  lr_scales: tuple[float, ...] = (1.0,)  # each problem is trained at each lr * scale

  def model_config(self, layout: str, length: int) -> ModelConfig:
    return ModelConfig(d_model=self.d_model, num_layers=self.num_layers, layout=layout,
                       num_heads=self.num_heads, mlp_hidden=self.mlp_hidden,
                       conv_impl=self.conv_impl, li_impl="fft", attention_impl="xla",
                       max_seqlen=max(length, 256))

  def _opt_cfg(self, constant: bool):
    return types.SimpleNamespace(
        learning_rate=self.learning_rate, weight_decay=self.weight_decay, b1=0.9, b2=self.b2,
        eps=1e-8, grad_clip=1.0, decay_embedding=True,
        warmup_steps=0 if constant else max(1, int(self.steps * self.warmup_frac)),
        min_lr_ratio=1.0 if constant else self.min_lr_ratio)

  def optimizer(self):
    """The trainer's AdamW at its peak rate; the schedule comes in as ``lr_factors``."""
    return make_optimizer(self._opt_cfg(constant=True), 1)

  def lr_factors(self) -> np.ndarray:
    """[steps] float32: the trainer's schedule for ``steps`` steps over its peak."""
    schedule = learning_rate_schedule(self._opt_cfg(constant=False), self.steps)
    return np.asarray(schedule(np.arange(self.steps)), np.float32) / self.learning_rate


def _pool(spec: TaskSpec, split: str, n: int, length: int) -> dict[str, np.ndarray]:
  b = spec.batch(split, 0, n)
  pad = length - spec.seq_len
  if pad:
    widths = ((0, 0), (0, pad))
    b = {"inputs": np.pad(b["inputs"], widths, constant_values=PAD_ID),
         "targets": np.pad(b["targets"], widths, constant_values=PAD_ID),
         "weights": np.pad(b["weights"], widths),
         "query_ids": np.pad(b["query_ids"], widths, constant_values=-1)}
  return b


def make_pools(specs: list[TaskSpec], n: int, split: str, length: int,
               workers: int = 1) -> dict[str, np.ndarray]:
  """Examples 0..n-1 of ``split`` of every spec, padded to ``length``: arrays [T, n, length]."""
  args = [(s, split, n, length) for s in specs]
  if workers > 1:  # spawn: safe whatever JAX has started in this process
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
      pools = list(ex.map(_pool, *zip(*args)))
  else:
    pools = [_pool(*a) for a in args]
  return {k: np.stack([p[k] for p in pools]) for k in pools[0]}



@dataclasses.dataclass
class Compiled:
  """One layout's compiled functions for ``n_specs`` problems x ``len(lr_scales)`` rates."""
  layout: str
  init: object
  run: object  # (params, opt_state, pool, key, factors) -> (params, opt_state, losses)
  predict: object  # (params, inputs [T, chunk, L]) -> argmax [T, chunk, L]
  steps_per_call: int = 0
  compile_s: float = 0.0


def _functions(cfg: SweepConfig, layout: str, length: int, n_specs: int):
  model_cfg = cfg.model_config(layout, length)
  graphdef, state = nnx.split(StripedHyena(model_cfg, rngs=nnx.Rngs(cfg.seed)))
  params0 = nnx.to_pure_dict(state)
  tx = cfg.optimizer()
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, remat="none", accum=1,
                           mesh=None)
  n_scales = len(cfg.lr_scales)
  n = n_specs * n_scales
  spec_of = np.repeat(np.arange(n_specs), n_scales)  # problem p trains spec p // n_scales
  scales = np.tile(np.asarray(cfg.lr_scales, np.float32), n_specs)

  def init():
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), params0)
    return params, jax.vmap(tx.init)(params)

  def scaled_step(params, opt_state, batch, scale):
    new, opt_state, m = step(params, opt_state, batch)
    new = jax.tree.map(lambda p, q: p + scale * (q - p), params, new)
    return new, opt_state, m

  def run(params, opt_state, pool, key, factors):
    """``steps_per_call`` steps at learning rates ``lr * scale * factors`` ([spc])."""
    def body(carry, xs):
      p, o = carry
      k, f = xs
      idx = jax.random.randint(k, (n, cfg.batch_size), 0, pool["inputs"].shape[1])
      batch = {name: a[spec_of[:, None], idx] for name, a in pool.items()}
      p, o, m = jax.vmap(scaled_step)(p, o, batch, scales * f)
      return (p, o), m["loss"]
    xs = (jax.random.split(key, cfg.steps_per_call), factors)
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), xs)
    return params, opt_state, losses

  def predict(params, inputs):
    def one(p, x):
      return jnp.argmax(nnx.merge(graphdef, p)(x), axis=-1).astype(jnp.int32)
    return jax.vmap(one)(params, inputs[spec_of])

  return init, run, predict


EVAL_CHUNK = 128


def compile_layouts(cfg: SweepConfig, layouts, n_specs: int, length: int, n_train: int,
                    n_eval: int, threads: int = 0) -> dict[str, Compiled]:
  """Trace every layout here, compile them all at once in threads (XLA compiles release the
  GIL): compile time is most of a small sweep's cost on one GPU."""
  chunk = min(EVAL_CHUNK, n_eval)
  pool = {k: jax.ShapeDtypeStruct((n_specs, n_train, length), jnp.float32 if k == "weights"
                                  else jnp.int32) for k in ("inputs", "targets", "weights")}
  inputs = jax.ShapeDtypeStruct((n_specs, chunk, length), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  factors = jax.ShapeDtypeStruct((cfg.steps_per_call,), jnp.float32)
  lowered = {}
  for layout in layouts:
    init, run, predict = _functions(cfg, layout, length, n_specs)
    init = jax.jit(init)
    p, o = jax.eval_shape(init)
    lowered[layout] = (init, jax.jit(run, donate_argnums=(0, 1)).lower(
        p, o, pool, key, factors),
                       jax.jit(predict).lower(p, inputs))

  def build(layout):
    t = time.perf_counter()
    init, run, predict = lowered[layout]
    return Compiled(layout, init, run.compile(), predict.compile(), cfg.steps_per_call,
                    time.perf_counter() - t)

  with ThreadPoolExecutor(threads or len(lowered)) as ex:
    return dict(zip(lowered, ex.map(build, lowered)))


def time_call(c: Compiled, pool: dict) -> float:
  """Seconds of one ``run`` call (``steps_per_call`` steps) on a throwaway model: the first
  call, so a slight overestimate (allocations) — meant for sizing a budget, not for reporting."""
  params, opt_state = c.init()
  jax.block_until_ready(params)
  t = time.perf_counter()
  _, _, loss = c.run(params, opt_state, pool, jax.random.key(0),
                     np.full(c.steps_per_call, 0.5, np.float32))
  jax.block_until_ready(loss)
  return time.perf_counter() - t


def device_pool(pool: dict) -> dict:
  return {k: jnp.asarray(pool[k]) for k in ("inputs", "targets", "weights")}


def train_and_eval(cfg: SweepConfig, c: Compiled, pool: dict, eval_pool: dict,
                   log=None) -> list[dict]:
  """Train all problems of layout ``c`` for ``cfg.steps`` steps (the same batches for every
  layout: the key depends only on the seed); one record per (spec, lr scale), spec-major:
  ``token_acc``, ``query_acc``, ``final_loss`` (mean of the last 10% of steps)."""
  if cfg.steps % cfg.steps_per_call:
    raise ValueError(f"steps {cfg.steps} is not a multiple of steps_per_call "
                     f"{cfg.steps_per_call}")
  params, opt_state = c.init()
  key = jax.random.key(cfg.seed + 1)
  factors = cfg.lr_factors()
  losses = []
  for done in range(cfg.steps_per_call, cfg.steps + 1, cfg.steps_per_call):
    key, sub = jax.random.split(key)
    params, opt_state, loss = c.run(params, opt_state, pool, sub,
                                    factors[done - cfg.steps_per_call:done])
    losses.append(np.asarray(loss))
    if log:
      log(f"  {c.layout:<13} step {done:5d}  loss " + " ".join(f"{x:.2f}" for x in losses[-1][-1]))
  losses = np.concatenate(losses)  # [steps, T]
  tail = max(1, cfg.steps // 10)
  n_specs, n_eval = eval_pool["inputs"].shape[:2]
  n_scales = len(cfg.lr_scales)
  chunk = min(EVAL_CHUNK, n_eval)
  if n_eval % chunk:
    raise ValueError(f"n_eval {n_eval} is not a multiple of {chunk}")
  counts = [dict() for _ in range(n_specs * n_scales)]
  for s in range(0, n_eval - chunk + 1, chunk):
    pred = np.asarray(c.predict(params, jnp.asarray(eval_pool["inputs"][:, s:s + chunk])))
    for t in range(len(counts)):
      sl = (t // n_scales, slice(s, s + chunk))
      got = accuracy_counts(pred[t], eval_pool["targets"][sl], eval_pool["weights"][sl],
                            eval_pool["query_ids"][sl])
      counts[t] = {k: counts[t].get(k, 0) + v for k, v in got.items()}
  return [{**summarize(cnt), "final_loss": float(losses[-tail:, t].mean()),
           "lr": cfg.learning_rate * cfg.lr_scales[t % n_scales]}
          for t, cnt in enumerate(counts)]


def train_layout(cfg: SweepConfig, layout: str, specs: list[TaskSpec], train_pool: dict,
                 eval_pool: dict, log=None) -> list[dict]:
  """Compile and train one layout on ``specs`` (pools from ``make_pools``)."""
  n_specs, n_train, length = train_pool["inputs"].shape
  c = compile_layouts(cfg, [layout], n_specs, length, n_train, eval_pool["inputs"].shape[1])
  return train_and_eval(cfg, c[layout], device_pool(train_pool), eval_pool, log)
