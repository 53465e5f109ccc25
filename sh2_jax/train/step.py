"""The jitted train and eval steps over pure parameter dicts.

params: pure dict of float32 (``param_dtype``) arrays, the master weights; the model computes in
``ModelConfig.dtype`` (bf16 casts happen inside the layers). Gradients are float32. Batches:
``inputs``/``targets`` [B, L] int32, ``weights`` [B, L] float32 (0 on padding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sh2_jax.modes import ContextParallel
from sh2_jax.parallel.context import context_parallel_logits
from sh2_jax.sharding import BATCH_AXES


LATENCY_HIDING = ("auto", "on", "off")


def compiler_options(mesh: Mesh | None, latency_hiding: str = "auto") -> dict:
  """XLA options for compiling the train step (``config.latency_hiding``).

  ``auto`` turns XLA GPU's latency-hiding scheduler off on a context mesh. There it overlaps
  the context collectives (halo exchanges, all-to-alls, K/V gathers) and the per-block FSDP
  gathers and reduce-scatters with compute by keeping buffers of many blocks live at once: the
  compiled step of the 7B layout at 128K over 4 H200s needed 6.0 GiB more per added layer with
  it and 0.71 GiB without (the saved block input is 0.25 GiB; benchmarks/cp_memory.py,
  benchmarks/RESULTS.md, issue 18), which is why the 32-layer 7B asked for 192 GiB per device.
  Elsewhere the default (on) stays. Other backends ignore the option."""
  if latency_hiding not in LATENCY_HIDING:
    raise ValueError(f"latency_hiding {latency_hiding!r} is not one of {', '.join(LATENCY_HIDING)}")
  on = (latency_hiding == "on" or
        (latency_hiding == "auto" and (mesh is None or mesh.shape["context"] == 1)))
  return {} if on else {"xla_gpu_enable_latency_hiding_scheduler": False}


def forward(model, tokens: jax.Array, remat: str = "none", mesh: Mesh | None = None,
            context_modes: dict | None = None) -> jax.Array:
  """tokens [B, L] -> logits [B, L, V] float32: the model's one forward with the blocks
  optionally rematerialised (``blocks`` recomputes each block in the backward pass, ``dots``
  keeps the matmul outputs). With a ``mesh`` whose 'context' axis is larger than 1 the
  sequence is split over it, each operator by the ``context_modes``
  (``config.context_parallel``: mr_mode, li_mode, attention_mode)."""
  if mesh is not None and mesh.shape["context"] > 1:  # zig-zag context parallelism
    cp = ContextParallel(size=mesh.shape["context"], remat=remat != "none",
                         **(context_modes or {}))
    return context_parallel_logits(model, tokens, mesh, cp, batch_axes=BATCH_AXES)
  return model.forward(tokens, remat=remat)[0]


def loss_sums(graphdef, params, batch, remat: str, mesh: Mesh | None,
              context_modes: dict | None = None):
  """(sum of token NLL in nats, sum of weights) over a batch."""
  model = nnx.merge(graphdef, params)
  logits = forward(model, batch["inputs"], remat, mesh, context_modes)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])


def _microbatches(batch: dict, accum: int, mesh: Mesh | None) -> dict:
  """[B, ...] -> [accum, B/accum, ...]; microbatch j takes rows j, j + accum, ..., so every
  device keeps its own rows (no resharding)."""
  def split(x):
    y = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES, "context")))
    return y
  return jax.tree.map(split, batch)


def train_step(params, opt_state, batch, *, graphdef, tx: optax.GradientTransformation,
               remat: str, accum: int, mesh: Mesh | None, context_modes: dict | None = None):
  """One optimizer update on the mean token loss of ``batch`` (accumulated over ``accum``
  microbatches). Returns (params, opt_state, metrics) with metrics ``loss``, ``grad_norm``
  (before clipping) and ``tokens`` (weighted target count)."""
  grad_fn = jax.value_and_grad(functools.partial(loss_sums, graphdef, remat=remat, mesh=mesh,
                                                 context_modes=context_modes), has_aux=True)
  if accum == 1:
    (nll, count), grads = grad_fn(params, batch)
  else:
    def body(carry, micro):
      (n, c), g = grad_fn(params, micro)
      return jax.tree.map(jnp.add, carry, (n, c, g)), None
    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    (nll, count, grads), _ = jax.lax.scan(body, zeros, _microbatches(batch, accum, mesh))
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": nll / count, "grad_norm": optax.tree.norm(grads), "tokens": count}
  return params, opt_state, metrics


def eval_step(params, batch, *, graphdef, mesh: Mesh | None, context_modes: dict | None = None):
  """(sum of NLL, sum of weights) over ``batch``, no gradients."""
  nll, count = loss_sums(graphdef, params, batch, "none", mesh, context_modes)
  return {"nll": nll, "tokens": count}
