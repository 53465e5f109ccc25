"""Train small models of one layout on several synthetic tasks at once, with an equal budget.

The trainer's own ``train_step`` (weighted loss = loss on the answer tokens) and optimizer
(``make_optimizer``) do the work; this module only batches it: the ``T`` (task, level) problems
of a sweep get ``T`` independent copies of the same model (same initialisation), trained side by
side with ``jax.vmap`` inside a ``lax.scan`` of steps, so a layout compiles once for all tasks.

Problems of different lengths share one compiled step by right-padding every example to the
longest length with PAD and weight 0: the models are causal, so predictions at the real
positions of a short example do not depend on the padding — a short problem padded is exactly
the short problem.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from concurrent.futures import ProcessPoolExecutor
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
from sh2_jax.train.optim import make_optimizer
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
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  weight_decay: float = 0.1
  n_train: int = 2048  # examples per problem in the training pool (batches sample it)
  n_eval: int = 256
  seed: int = 0
  conv_impl: str = "fft"  # SE/MR filters: FFT (fast on CPU, composes with vmap)
  steps_per_call: int = 100  # steps fused into one lax.scan

  def model_config(self, layout: str, length: int) -> ModelConfig:
    return ModelConfig(d_model=self.d_model, num_layers=self.num_layers, layout=layout,
                       num_heads=self.num_heads, mlp_hidden=self.mlp_hidden,
                       conv_impl=self.conv_impl, max_seqlen=max(length, 256))

  def optimizer(self):
    return make_optimizer(types.SimpleNamespace(
        learning_rate=self.learning_rate, warmup_steps=self.warmup_steps, min_lr_ratio=0.1,
        weight_decay=self.weight_decay, b1=0.9, b2=0.98, eps=1e-8, grad_clip=1.0,
        decay_embedding=True), self.steps)


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


def _trainer(cfg: SweepConfig, layout: str, length: int, n_tasks: int):
  model_cfg = cfg.model_config(layout, length)
  graphdef, state = nnx.split(StripedHyena(model_cfg, rngs=nnx.Rngs(cfg.seed)))
  params0 = nnx.to_pure_dict(state)
  tx = cfg.optimizer()
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, remat="none", accum=1,
                           mesh=None)

  @jax.jit
  def init():
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_tasks, *x.shape)), params0)
    return params, jax.vmap(tx.init)(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(4,))
  def run(params, opt_state, pool, key, num):
    """``num`` steps; every problem draws its own batch from its pool."""
    def body(carry, k):
      p, o = carry
      idx = jax.random.randint(k, (n_tasks, cfg.batch_size), 0, pool["inputs"].shape[1])
      batch = {name: jnp.take_along_axis(a, idx[:, :, None], axis=1) for name, a in pool.items()}
      p, o, m = jax.vmap(step)(p, o, batch)
      return (p, o), m["loss"]
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                               jax.random.split(key, num))
    return params, opt_state, losses

  @jax.jit
  def predict(params, inputs):
    def one(p, x):
      return jnp.argmax(nnx.merge(graphdef, p)(x), axis=-1).astype(jnp.int32)
    return jax.vmap(one)(params, inputs)

  return init, run, predict


def train_layout(cfg: SweepConfig, layout: str, specs: list[TaskSpec], train_pool: dict,
                 eval_pool: dict, log=None) -> list[dict]:
  """Train one model per spec (all with layout ``layout``) for ``cfg.steps`` steps; return one
  record per spec: ``token_acc``, ``query_acc``, ``final_loss`` (mean of the last 10%)."""
  n_tasks, _, length = train_pool["inputs"].shape
  init, run, predict = _trainer(cfg, layout, length, n_tasks)
  params, opt_state = init()
  pool = {k: jnp.asarray(train_pool[k]) for k in ("inputs", "targets", "weights")}
  key = jax.random.key(cfg.seed + 1)  # the same batches for every layout
  losses, done = [], 0
  while done < cfg.steps:
    num = min(cfg.steps_per_call, cfg.steps - done)
    key, sub = jax.random.split(key)
    params, opt_state, loss = run(params, opt_state, pool, sub, num)
    losses.append(np.asarray(loss))
    done += num
    if log:
      log(f"  {layout:<13} step {done:5d}  loss per task "
          + " ".join(f"{x:.2f}" for x in losses[-1][-1]))
  losses = np.concatenate(losses)  # [steps, T]
  tail = max(1, cfg.steps // 10)
  counts = [dict() for _ in range(n_tasks)]
  chunk = 128
  for s in range(0, eval_pool["inputs"].shape[1], chunk):
    pred = np.asarray(predict(params, jnp.asarray(eval_pool["inputs"][:, s:s + chunk])))
    for t in range(n_tasks):
      c = accuracy_counts(pred[t], eval_pool["targets"][t, s:s + chunk],
                          eval_pool["weights"][t, s:s + chunk],
                          eval_pool["query_ids"][t, s:s + chunk])
      counts[t] = {k: counts[t].get(k, 0) + v for k, v in c.items()}
  return [{**summarize(c), "final_loss": float(losses[-tail:, t].mean())}
          for t, c in enumerate(counts)]
