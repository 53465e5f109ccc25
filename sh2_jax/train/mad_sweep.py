"""MAD's training protocol for many small models at once: every (learning rate, weight decay,
seed) run of one (task, setting, layout) is one slot of a ``jax.vmap`` over the model init, the
AdamW step and the evaluation, so the whole grid trains in one compiled step.

Protocol (MAD ``train.py``, ``mad/configs.py``, ``mad/model/pl_model_wrapper.py``):

* AdamW (torch defaults: b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay on every
  parameter), no gradient clipping, batch 128 with the data reshuffled every epoch and the last
  batch short (here: padded with rows of weight 0, the same mean loss);
* cosine annealing over ``epochs`` (200) from the peak rate to ``min_lr`` 1e-6, stepped once per
  epoch (``CosineAnnealingLR``, Lightning's per-epoch interval); MAD has no warmup
  (``warmup_epochs`` 0 keeps it so);
* evaluation on the test split after every epoch; a run stops when its test accuracy reaches
  0.999 (MAD's EarlyStopping ``stopping_threshold``), or, with ``patience`` > 0, after that many
  evaluations without improvement (MAD's ``early_stop``/``stop_patience``, off by default);
* the score of a run is the test accuracy of its checkpoint with the lowest test loss (MAD's
  ``ModelCheckpoint(monitor="test/Perplexity_epoch", mode="min")``, which its final test loads;
  ``test_acc``), the final model's kept beside it (``test_acc_final``), and the score of a
  setting the best over the grid (``mad/analysis.py``); accuracy is MAD's ``MulticlassAccuracy``
  over the scored positions, which is *macro*-averaged over classes (torchmetrics' default:
  per-class recall, averaged over the classes that occur among targets or predictions). The micro
  (per-token) accuracy is kept beside it.

Models (``LAYOUTS``): width 128 and MAD's depth of 2 sequence mixers + 2 channel mixers (two of
our blocks, each a mixer and a gated MLP) for the single-operator layouts; the striped hybrids
have one block per operator (3 or 4), since two blocks cannot hold them. Multi-head attention
has MAD's 16 heads; the gated MLP has SwiGLU's 352 hidden units at width 128. Compression uses
MAD's auto-encoder (``MADAutoEncoder``).

Deviations: our blocks' RMSNorm pre-norm with two residuals, tied input/output embedding
(``StripedHyena``; MAD's unembedding is a separate biased linear layer), the gated MLP's gate is
GELU (SwiGLU: SiLU), Hyena operators are ours (SE/MR/LI), and bf16 compute with float32 master
weights (MAD: ``bf16`` Lightning precision); our parameter initialisation, no biases on the
attention projections (MAD's have them), the compression encoder pooled after the final norm
(MAD's before it), and instances drawn from MAD's generators' distributions rather than its
published data files. Where MAD's paper table and its code differ (Adam b2 0.98 vs 0.999,
SwiGLU width 512 vs 352), the code's values are used.

Resuming: after every evaluation each group of runs saves its state (``state_g{i}.npz``:
parameters, Adam moments, epoch, stop flags) and all curves go to ``curves.json``; running the
same command again continues from the saved epoch (the epoch order is a function of
(seed, epoch), so a resumed run is the run that was not interrupted). A group whose runs have
all stopped deletes its state: a finished (task, setting, layout) directory keeps only
``curves.json`` (about 270 kB after 200 epochs of 6 runs), while an unfinished one holds
parameters and both Adam moments of every run it still holds (measured for the grid of 6 at
width 128: 28 MiB for the 2-block layouts, 42 MiB for SE-MR-LI, 56 MiB for SE-MR-LI-MHA). A
``Budget`` stops training at an epoch boundary before a wall-clock deadline, leaving that state
to resume from.

Stragglers: a group runs while any of its runs trains, and a stopped run's frozen slot costs a
whole run's step (on the H200 the grid's step is compute-bound: 6 runs cost ~6 times one). So
when at most half of the runs a group holds still train (``compact_runs``), the group goes on
with those alone: one compile per grid size, the same runs to rounding, and a state that shrinks
with them (``held`` in ``state_g*.npz``: which runs it holds). On the first H200 calls the
smallest learning rate's two runs were still training long after the other four had stopped
(in-context recall with attention: epoch 185 against 25-101).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sh2_jax import files
from sh2_jax.config import ModelConfig
from sh2_jax.layers import Dense, RMSNorm
from sh2_jax.model import StripedHyena
from sh2_jax.synthetic import mad

LAYOUTS = {"MHA": "MHA", "Hyena-SE": "SE", "Hyena-MR": "MR", "Hyena-LI": "LI",
           "SE-MR-LI-MHA": "SE-MR-LI-MHA", "SE-MR-LI": "SE-MR-LI"}

# MADTrainConfig fields that choose an implementation, not the protocol: a run resumes under
# other values (the implementations agree to rounding; tests/ops, tests/kernels).
IMPL_FIELDS = ("attention_impl", "conv_impl", "li_impl", "compact_runs")


def protocol(config: dict | None) -> dict:
  """A ``MADTrainConfig`` as a JSON-ready dict (``dataclasses.asdict``, or read back from a
  file) without its ``IMPL_FIELDS``: what two runs must share for one to resume or stand in for
  the other."""
  return json.loads(json.dumps({k: v for k, v in (config or {}).items()
                                if k not in IMPL_FIELDS}))


@dataclasses.dataclass(frozen=True)
class MADTrainConfig:
  """Model size and training protocol shared by every run of a sweep (defaults: MAD's)."""
  d_model: int = 128
  num_heads: int = 16
  mlp_hidden: int = 352
  depth: int = 2  # blocks of a single-operator layout; hybrids get one per operator
  batch_size: int = 128
  epochs: int = 200
  min_lr: float = 1e-6
  warmup_epochs: int = 0
  learning_rates: tuple[float, ...] = mad.LEARNING_RATES
  weight_decays: tuple[float, ...] = mad.WEIGHT_DECAYS
  seeds: tuple[int, ...] = (0,)
  stop_acc: float = 0.999
  patience: int = 0
  dtype: str = "bfloat16"
  data_seed: int = 0
  num_test_examples: int = mad.NUM_TEST_EXAMPLES
  runs_per_group: int = 0  # runs vmapped together; 0: all (fewer for long sequences)
  # SE/MR/LI by FFT (the reference paths, which compose with vmap); attention by XLA, or cuDNN
  # on a GPU for the long settings (its memory does not grow with the square of the length).
  attention_impl: str = "xla"
  # SE/MR and LI inner filters: the model's ``conv_impl`` / ``li_impl`` (an implementation
  # choice, not part of the protocol: a run resumes under another one).
  conv_impl: str = "fft"
  li_impl: str = "fft"
  # when at most half of a group's runs still train, they go on as a smaller grid (one compile
  # per size; the same runs to rounding)
  compact_runs: bool = True

  def runs(self) -> list[tuple[float, float, int]]:
    return list(itertools.product(self.learning_rates, self.weight_decays, self.seeds))

  def lr(self, peak: float, epoch: int) -> float:
    """The learning rate of epoch ``epoch``: linear warmup, then CosineAnnealingLR."""
    if epoch < self.warmup_epochs:
      return peak * (epoch + 1) / self.warmup_epochs
    t = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1)
    return self.min_lr + (peak - self.min_lr) * (1 + math.cos(math.pi * t)) / 2

  def model_config(self, layout: str, vocab_size: int, length: int) -> ModelConfig:
    if layout not in LAYOUTS:
      raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    ops = LAYOUTS[layout]
    return ModelConfig(d_model=self.d_model, num_layers=max(self.depth, len(ops.split("-"))),
                       layout=ops, vocab_size=vocab_size, num_heads=self.num_heads,
                       mlp_hidden=self.mlp_hidden, evo2_style_activations=False,
                       mlp_activation="gelu", dtype=self.dtype, conv_impl=self.conv_impl,
                       li_impl=self.li_impl,
                       attention_impl=self.attention_impl, max_seqlen=max(length, 256))


def sincos(length: int, dim: int) -> np.ndarray:
  """[length, dim] fixed sin/cos position embeddings (MAD's ``posemb_sincos_1d``)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim // 2 - 1))
  angles = np.arange(length)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], 1).astype(np.float32)


class MADAutoEncoder(nnx.Module):
  """MAD's compression backbone: the causal stack encodes tokens [B, L]; its last position
  (after the final norm) plus fixed sin/cos position embeddings is decoded at every position by
  a non-expanding MLP (norm, linear, GELU, norm, linear, GELU) and a norm + biased linear
  unembedding -> logits [B, L, V]."""

  def __init__(self, cfg: ModelConfig, length: int, *, rngs: nnx.Rngs):
    d, f32 = cfg.d_model, dict(dtype=jnp.float32, param_dtype=jnp.float32)
    self.encoder = StripedHyena(cfg, rngs=rngs)
    self.positions = nnx.Variable(jnp.asarray(sincos(length, d)))
    self.norms = nnx.List([RMSNorm(d, eps=cfg.eps, **f32, rngs=rngs) for _ in range(3)])
    self.dense = nnx.List([Dense(d, d, use_bias=True, init=jax.nn.initializers.normal(0.02),
                                 **f32, rngs=rngs) for _ in range(2)])
    self.unembed = Dense(d, cfg.vocab_size, use_bias=True,
                         init=jax.nn.initializers.normal(0.02), **f32, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    h = self.encoder.hidden_states(tokens)["final_norm"][:, -1].astype(jnp.float32)
    x = h[:, None] + self.positions[...][None, :tokens.shape[1]]
    for norm, dense in zip(self.norms, self.dense):
      x = jax.nn.gelu(dense(norm(x)).astype(jnp.float32), approximate=False)
    return self.unembed(self.norms[2](x)).astype(jnp.float32)


def build_model(cfg: ModelConfig, task: str, length: int, rngs: nnx.Rngs):
  if task in mad.AUTOENCODER_TASKS:
    return MADAutoEncoder(cfg, length, rngs=rngs)
  return StripedHyena(cfg, rngs=rngs)


def macro_accuracy(tp, support, predicted):
  """torchmetrics' macro ``MulticlassAccuracy`` from per-class counts [..., V]: recall per
  class, averaged over the classes that occur among targets or predictions."""
  recall = tp / jnp.maximum(support, 1)
  present = (support + predicted - tp) > 0
  return jnp.sum(recall * present, -1) / jnp.maximum(jnp.sum(present, -1), 1)


@functools.lru_cache(maxsize=8)
def compiled_group(model_cfg: ModelConfig, task: str, length: int, n_train: int,
                   batch_size: int) -> "Group":
  """One ``Group`` per model and data shape, kept for the process: settings and resumed runs
  of the same shapes reuse its compiled functions."""
  return Group(model_cfg, task, length, n_train, batch_size)


class Group:
  """The jitted functions for runs of one model on one data shape (any number of runs: the
  leading axis of every argument)."""

  def __init__(self, model_cfg: ModelConfig, task: str, length: int, n_train: int,
               batch_size: int):
    self.n_train, self.batch_size = n_train, batch_size
    self.steps = -(-n_train // batch_size)
    vocab = model_cfg.vocab_size
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, task, length, nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)
    self.adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

    def init(key):
      params = nnx.to_pure_dict(nnx.split(build_model(model_cfg, task, length,
                                                      nnx.Rngs(key)))[1])
      return params, self.adam.init(params)

    def apply(params, tokens):
      return nnx.merge(self.graphdef, params)(tokens)

    def loss(params, inputs, targets):
      w = (targets != mad.IGNORE).astype(jnp.float32)
      nll = optax.softmax_cross_entropy_with_integer_labels(
          apply(params, inputs), jnp.where(targets == mad.IGNORE, 0, targets))
      return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    def step(params, adam_state, inputs, targets, lr, wd, active):
      value, grads = jax.value_and_grad(loss)(params, inputs, targets)
      updates, new_adam = self.adam.update(grads, adam_state)
      new = jax.tree.map(lambda p, u: p - lr * (u + wd * p), params, updates)
      keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(active, x, y), a, b)
      return keep(new, params), keep(new_adam, adam_state), value

    def epoch(params, adam_state, train_x, train_y, order, lr, wd, active):
      """order [n, steps, B] row ids (n_train = a padding row) -> one epoch per run."""
      def body(carry, idx):
        p, a = carry
        p, a, value = jax.vmap(step)(p, a, train_x[idx], train_y[idx], lr, wd, active)
        return (p, a), value
      (params, adam_state), values = jax.lax.scan(body, (params, adam_state),
                                                  jnp.swapaxes(order, 0, 1))
      return params, adam_state, values.mean(0)

    def evaluate(params, test_x, test_y):
      """test_x/test_y [batches, B, L] -> per run: loss, macro accuracy, token accuracy."""
      def body(acc, batch):
        x, y = batch
        logits = jax.vmap(apply, (0, None))(params, x)  # [n, B, L, V]
        w = y != mad.IGNORE
        safe = jnp.where(w, y, 0)
        nll = jax.vmap(optax.softmax_cross_entropy_with_integer_labels, (0, None))(logits, safe)
        pred = jnp.argmax(logits, -1)
        hit = (pred == safe) & w
        count = lambda ids, m: jax.vmap(lambda i, mm: jnp.zeros(vocab).at[i.reshape(-1)].add(
            mm.reshape(-1).astype(jnp.float32)))(ids, m)
        wb = jnp.broadcast_to(w, hit.shape)
        sb = jnp.broadcast_to(safe, hit.shape)
        new = (acc[0] + jnp.sum(nll * w, (1, 2)), acc[1] + jnp.sum(hit, (1, 2)),
               acc[2] + count(sb, hit), acc[3] + count(sb, wb), acc[4] + count(pred, wb))
        return new, None
      n = jax.tree.leaves(params)[0].shape[0]
      zeros = (jnp.zeros(n), jnp.zeros(n), jnp.zeros((n, vocab)), jnp.zeros((n, vocab)),
               jnp.zeros((n, vocab)))
      (nll, hits, tp, support, predicted), _ = jax.lax.scan(body, zeros, (test_x, test_y))
      total = jnp.maximum(jnp.sum(test_y != mad.IGNORE), 1)
      return nll / total, macro_accuracy(tp, support, predicted), hits / total

    self.init = jax.jit(jax.vmap(init))
    self.epoch = jax.jit(epoch, donate_argnums=(0, 1))
    self.evaluate = jax.jit(evaluate)


class Budget:
  """A wall-clock deadline (``time.time()`` seconds; None: none) for the groups one process
  trains: an epoch starts only when its estimate ends before the deadline. The estimate is the
  group's previous epoch in this process, or, for a group's first epoch (which compiles), the
  longest first epoch this process has seen (0 before any: the first one always starts if the
  deadline has not passed), times ``margin``."""

  def __init__(self, deadline: float | None, margin: float = 1.25, clock=time.time):
    self.deadline, self.margin, self.clock = deadline, margin, clock
    self.first_epoch_s = 0.0
    self.stopped = False

  def allows(self, estimate_s: float) -> bool:
    if self.deadline is not None and self.clock() + self.margin * estimate_s > self.deadline:
      self.stopped = True
    return not self.stopped


def run_done(cfg: MADTrainConfig, run: dict) -> bool:
  """Whether a run (its record: lr, weight decay, seed, curve) stops after its last evaluated
  epoch: MAD's 0.999 threshold, ``patience`` evaluations without a better test accuracy, or
  the last epoch."""
  accs = [c["test_acc"] for c in run["curve"]]
  stale = len(accs) - 1 - int(np.argmax(accs))
  return (accs[-1] >= cfg.stop_acc or bool(cfg.patience and stale >= cfg.patience)
          or run["curve"][-1]["epoch"] == cfg.epochs)


def run_scores(curve: list[dict]) -> dict:
  """A run's scores from its per-epoch curve: MAD's (the epoch with the lowest test loss: the
  checkpoint its final test loads) and the final model's."""
  best = min(curve, key=lambda c: c["test_loss"])
  return {"test_acc": best["test_acc"], "test_token_acc": best["test_token_acc"],
          "best_epoch": best["epoch"], "test_acc_final": curve[-1]["test_acc"],
          "test_token_acc_final": curve[-1]["test_token_acc"]}


def _save(path: str, state: dict) -> None:
  # per-process temporary names: processes of one workdir may write the same data
  files.write_atomic(path, lambda tmp: np.savez(tmp, **state))


def load_data(cfg: MADTrainConfig, task: str, kwargs: dict, setting_dir: str):
  """(train_x, train_y, test_x, test_y) of one setting, generated once and kept in
  ``setting_dir/data.npz`` for every layout and later session (regenerated when the setting,
  seed or test size differ)."""
  path = os.path.join(setting_dir, "data.npz")
  key = json.dumps({"task": task, "kwargs": kwargs, "seed": cfg.data_seed,
                    "n_test": cfg.num_test_examples}, sort_keys=True)
  if os.path.exists(path):
    saved = np.load(path)
    if str(saved["key"]) == key:
      return saved["train_x"], saved["train_y"], saved["test_x"], saved["test_y"]
  train_x, train_y = mad.dataset(task, "train", kwargs, seed=cfg.data_seed)
  test_x, test_y = mad.dataset(task, "test", kwargs, n=cfg.num_test_examples,
                               seed=cfg.data_seed)
  os.makedirs(setting_dir, exist_ok=True)
  _save(path, {"key": np.asarray(key), "train_x": train_x, "train_y": train_y,
               "test_x": test_x, "test_y": test_y})
  return train_x, train_y, test_x, test_y


def train_setting(cfg: MADTrainConfig, task: str, setting: str, kwargs: dict, layout: str,
                  workdir: str, log=print, budget: Budget | None = None,
                  save_every_s: float = 0.0) -> dict:
  """Train (or resume) every run of ``cfg.runs()`` on one task setting with one layout; the
  state and ``curves.json`` live in ``workdir/task/setting/layout``. Returns the curves record:
  per run its lr, weight decay, seed, per-epoch curves and final test accuracy, ``best``,
  ``complete``, and ``timing`` (this call's epochs, their seconds and steps per second, the
  process's peak device memory so far; not saved). With ``budget``, stops at an epoch boundary
  before its deadline (``complete`` False, the state saved). The state is saved after every
  epoch, or with ``save_every_s`` > 0 at most that often (and at a budget stop): a process
  killed outright then retrains at most that many seconds, and a GPU process does not write
  its tens of MB every epoch."""
  out_dir = os.path.join(workdir, task, setting, layout)
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.perf_counter()
  train_x, train_y, test_x, test_y = load_data(cfg, task, kwargs,
                                               os.path.join(workdir, task, setting))
  overlap = mad.overlap(train_x, test_x)
  if overlap > 0.001:
    log(f"warning: {overlap:.3f} of the test inputs of {task} {setting} are in the train split")
  n_train, length = train_x.shape
  vocab = kwargs.get("vocab_size", mad.BASELINES[task]["vocab_size"])
  pad_x = np.concatenate([train_x, np.zeros((1, length), np.int32)])
  pad_y = np.concatenate([train_y, np.full((1, length), mad.IGNORE, np.int32)])
  eb = min(cfg.batch_size, len(test_x))
  n_eval = len(test_x) // eb * eb
  tx = jnp.asarray(test_x[:n_eval].reshape(-1, eb, length))
  ty = jnp.asarray(test_y[:n_eval].reshape(-1, eb, length))
  dx, dy = jnp.asarray(pad_x), jnp.asarray(pad_y)
  runs = cfg.runs()
  size = cfg.runs_per_group or len(runs)
  groups = [runs[i:i + size] for i in range(0, len(runs), size)]
  curves_path = os.path.join(out_dir, "curves.json")
  record = {"task": task, "setting": setting, "layout": layout, "kwargs": kwargs,
            "config": dataclasses.asdict(cfg), "n_train": n_train, "n_test": n_eval,
            "seq_len": length, "test_train_overlap": overlap,
            "data_seconds": time.perf_counter() - t0, "runs": []}
  if os.path.exists(curves_path):
    with open(curves_path) as f:
      old = json.load(f)
    same = {"config": protocol(record["config"]), "kwargs": json.loads(json.dumps(kwargs))}
    if {"config": protocol(old.get("config")), "kwargs": old.get("kwargs")} != same:
      raise ValueError(f"{out_dir} holds a run of another configuration; use a new workdir")
    record["runs"] = old["runs"]
  if not record["runs"]:
    record["runs"] = [{"lr": lr, "weight_decay": wd, "seed": s, "curve": [], "done": False}
                      for lr, wd, s in runs]
  group = compiled_group(cfg.model_config(layout, vocab, length), task, length, n_train,
                         cfg.batch_size)
  budget = budget or Budget(None)
  timing = {"epochs": 0, "first_epoch_s": None, "epoch_s": [], "steps_per_epoch": group.steps}
  for g, members in enumerate(groups):
    recs = record["runs"][g * size:g * size + len(members)]
    state_path = os.path.join(out_dir, f"state_g{g}.npz")
    if all(r["done"] for r in recs):
      if os.path.exists(state_path):  # finished: the curves are all that is kept
        os.remove(state_path)
      continue
    if not budget.allows(budget.first_epoch_s):
      break
    tg = time.perf_counter()
    lr = np.asarray([m[0] for m in members], np.float32)
    wd = np.asarray([m[1] for m in members], np.float32)
    seeds = [m[2] for m in members]
    params, adam_state = group.init(jnp.stack([jax.random.key(s) for s in seeds]))
    start = 0
    held = np.arange(len(members))  # the members whose state the device arrays hold
    if os.path.exists(state_path):  # the state and its runs' curves, saved together
      saved = np.load(state_path)
      leaves, treedef = jax.tree.flatten((params, adam_state))
      if int(saved["n_leaves"]) != len(leaves):
        raise ValueError(f"{state_path} does not match this model; use a new workdir")
      params, adam_state = jax.tree.unflatten(
          treedef, [jnp.asarray(saved[f"leaf_{i}"]) for i in range(len(leaves))])
      start = int(saved["epoch"])
      recs[:] = json.loads(str(saved["runs_json"]))
      if "held" in saved:
        held = np.asarray(saved["held"])
    else:
      recs[:] = [{"lr": lr, "weight_decay": wd, "seed": s, "curve": [], "done": False}
                 for lr, wd, s in members]
    record["runs"][g * size:g * size + len(members)] = recs
    active = np.asarray([not r["done"] for r in recs])
    last_s = None  # this group's previous epoch here (None: the group's first is next)
    compiles = True  # the next epoch compiles (the group's first, or the first after a compaction)
    saved_at, unsaved = time.perf_counter(), None

    def save(params, adam_state, epoch, runs_json, held):
      leaves = jax.tree.leaves((params, adam_state))
      _save(state_path, {"epoch": np.asarray(epoch), "n_leaves": np.asarray(len(leaves)),
                         "runs_json": np.asarray(runs_json), "held": np.asarray(held),
                         **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}})

    for e in range(start, cfg.epochs):
      if not active.any():
        break
      if last_s is not None and not budget.allows(budget.first_epoch_s if compiles else last_s):
        if unsaved:
          save(*unsaved)
        break
      te, compiled, compiles = time.perf_counter(), compiles, False
      order = np.full((len(held), group.steps * cfg.batch_size), n_train, np.int32)
      for i, m in enumerate(held):
        order[i, :n_train] = np.random.default_rng([seeds[m], e]).permutation(n_train)
      order = order.reshape(len(held), group.steps, cfg.batch_size)
      lrs = jnp.asarray([cfg.lr(float(lr[m]), e) for m in held], jnp.float32)
      params, adam_state, train_loss = group.epoch(
          params, adam_state, dx, dy, jnp.asarray(order), lrs, jnp.asarray(wd[held]),
          jnp.asarray(active[held]))
      test_loss, acc, token_acc = map(np.asarray, group.evaluate(params, tx, ty))
      train_loss = np.asarray(train_loss)
      for i, m in enumerate(held):
        if not active[m]:
          continue
        r = recs[m]
        r["curve"].append({"epoch": e + 1, "lr": float(lrs[i]), "train_loss": float(train_loss[i]),
                           "test_loss": float(test_loss[i]), "test_acc": float(acc[i]),
                           "test_token_acc": float(token_acc[i])})
        if run_done(cfg, r):
          r["done"] = True
          active[m] = False
        r.update(run_scores(r["curve"]))
      keep = [i for i, m in enumerate(held) if active[m]]
      if cfg.compact_runs and keep and len(keep) <= len(held) // 2:
        # the runs still training go on alone (a frozen run's slot costs a whole run's step);
        # the next epoch compiles for the smaller grid
        params, adam_state = jax.tree.map(lambda x: x[np.asarray(keep)], (params, adam_state))
        held, compiles = held[keep], True
      unsaved = (params, adam_state, e + 1, json.dumps(recs), held)
      if save_every_s <= 0 or time.perf_counter() - saved_at >= save_every_s:
        save(*unsaved)
        saved_at, unsaved = time.perf_counter(), None
      files.write_json(curves_path, record)
      if last_s is None:  # includes the compile (and, for the group, its init)
        timing["first_epoch_s"] = last_s = time.perf_counter() - tg
        budget.first_epoch_s = max(budget.first_epoch_s, last_s)
      else:
        last_s = time.perf_counter() - te
        if not compiled:  # an epoch after a compaction compiles: not a steady one
          timing["epoch_s"].append(last_s)
      timing["epochs"] += 1
      log(f"  {task} {setting} {layout} group {g} epoch {e + 1}/{cfg.epochs}: acc "
          + " ".join(f"{a:.3f}" for a in acc)
          + f"  ({last_s:.1f} s, {group.steps / last_s:.1f} steps/s)")
    if all(r["done"] for r in recs) and os.path.exists(state_path):
      os.remove(state_path)  # after curves.json holds the finished runs
    if budget.stopped:
      break
  finished = [r for r in record["runs"] if "test_acc" in r]
  if finished:
    best = max(finished, key=lambda r: r["test_acc"])
    record["best"] = {k: best[k] for k in ("lr", "weight_decay", "seed", "test_acc",
                                           "test_token_acc", "best_epoch", "test_acc_final")}
  record["complete"] = all(r["done"] for r in record["runs"])
  files.write_json(curves_path, record)
  steady = timing["epoch_s"]
  timing["epoch_s"] = sum(steady) / len(steady) if steady else timing["first_epoch_s"]
  timing["steps_per_s"] = group.steps / timing["epoch_s"] if timing["epoch_s"] else None
  timing["stopped_by_budget"] = budget.stopped and not record["complete"]
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
  timing["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30 or None
  return {**record, "timing": timing}
