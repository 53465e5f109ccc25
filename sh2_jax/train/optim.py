"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

Weight decay applies to the matrices that mix features — every Dense ``kernel`` (Hyena
projections, out_filter_dense, Wqkv, out_proj, the MLPs) and the tied embedding, which is also
the output projection (``optimizer.decay_embedding``, on by default as in GPT-2 practice).
No decay on: norm scales, biases, and every filter parameter (featurizer
``short_filter_weight``, SE/MR ``h``, LI ``log_rates``/``residues``, the skip ``D``): decay
would pull filters toward zero length and poles toward instability, not regularise.
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


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(
      schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
      mask=lambda p: decay_mask(p, opt_cfg.decay_embedding)))
  return optax.chain(*parts)
