"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

Weight decay applies to the matrices that mix features — every Dense ``kernel`` (Hyena
projections, out_filter_dense, Wqkv, out_proj, the MLPs) and the tied embedding, which is also
the output projection (``optimizer.decay_embedding``, on by default as in GPT-2 practice).
No decay on: norm scales, biases, and every filter parameter (featurizer
``short_filter_weight``, SE/MR ``h``, LI ``log_rates``/``residues``, the skip ``D``): decay
would pull filters toward zero length and poles toward instability, not regularise.

Frozen groups (``config.freeze = "embedding_layer,blocks.0"``: parameter paths or prefixes of
them, ``norm``, ``blocks.3.mlp``, ``blocks.10.filter``) get no update and no weight decay
(``optax.masked`` ``set_to_zero`` around the optimizer); clipping sees only the trained
parameters.
"""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  """0 -> peak over ``warmup_steps``, then cosine to ``peak * min_lr_ratio`` at ``num_steps``."""
  warmup = min(opt_cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def decay_mask(params: dict, decay_embedding: bool = True) -> dict:
  """Pure param dict -> same tree of bools: True where weight decay applies."""
  def rule(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "kernel":
      return True
    return decay_embedding and names[:2] == ["embedding_layer", "weight"]
  return jax.tree_util.tree_map_with_path(rule, params)


def param_path(keys) -> str:
  """A tree path as the dotted parameter name (``blocks.0.mlp.l1.kernel``)."""
  return ".".join(str(getattr(k, "key", k)) for k in keys)


def freeze_prefixes(spec: str) -> tuple[str, ...]:
  """``"embedding_layer, blocks.0"`` -> ("embedding_layer", "blocks.0")."""
  return tuple(p.strip() for p in spec.split(",") if p.strip()) if spec else ()


def freeze_labels(params, prefixes: tuple[str, ...]):
  """The tree of params with 'frozen' where a leaf's dotted path starts with a prefix (as a
  whole component: ``blocks.1`` is not ``blocks.10``), else 'trained'."""
  def label(keys, _):
    p = param_path(keys)
    return "frozen" if any(p == f or p.startswith(f + ".") for f in prefixes) else "trained"
  return jax.tree_util.tree_map_with_path(label, params)


def check_freeze(spec: str, abstract_params) -> tuple[str, ...]:
  """Every group of ``spec`` must name parameters of the model; not all may be frozen."""
  prefixes = freeze_prefixes(spec)
  paths = [param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(abstract_params)]
  for f in prefixes:
    if not any(p == f or p.startswith(f + ".") for p in paths):
      tops = sorted({p.split(".")[0] for p in paths})
      n = len({p.split(".")[1] for p in paths if p.startswith("blocks.")})
      raise ValueError(f"freeze group {f!r} names no parameter of this model; a group is a "
                       f"parameter path or a prefix of one: {', '.join(tops)}, blocks.0 .. "
                       f"blocks.{n - 1}, or a part of a block (blocks.0.mlp, blocks.0.filter)")
  if prefixes and "trained" not in jax.tree.leaves(freeze_labels(abstract_params, prefixes)):
    raise ValueError(f"freeze {spec!r} freezes every parameter; nothing would train")
  return prefixes


def with_frozen(tx: optax.GradientTransformation, prefixes: tuple[str, ...]):
  """``tx`` with the frozen groups' gradients zeroed before it (so clipping and the moments see
  only the trained parameters) and their updates zeroed after it (no weight decay). The state
  keeps ``tx``'s structure plus two empty entries, whichever groups are frozen."""
  if not prefixes:
    return tx
  zero = optax.masked(optax.set_to_zero(), lambda params: jax.tree.map(
      lambda label: label == "frozen", freeze_labels(params, prefixes)))
  return optax.chain(zero, tx, zero)


def make_optimizer(opt_cfg, num_steps: int, freeze: tuple[str, ...] = ()
                   ) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(
      schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
      mask=lambda p: decay_mask(p, opt_cfg.decay_embedding)))
  return with_frozen(optax.chain(*parts), freeze)
