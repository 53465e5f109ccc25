"""A model summary from a config alone: parameter count, per-layer types, FLOPs per token."""

from __future__ import annotations

import collections

from sh2_jax.config import ModelConfig
from sh2_jax.flops import flops_per_token, layer_flops, param_count


def summary(cfg: ModelConfig, seq_len: int | None = None) -> str:
  seq_len = seq_len or cfg.max_seqlen
  types = cfg.layer_types
  counts = collections.Counter(types)
  per_op = dict(zip(types, layer_flops(cfg, seq_len)))  # every block of one type costs the same
  lines = [
      f"parameters: {param_count(cfg):,}",
      f"width {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.head_dim}, "
      f"MLP {cfg.mlp_hidden}, SE/MR groups {cfg.se_groups}/{cfg.mr_groups}, vocab {cfg.vocab_size}",
      "layer types: " + ", ".join(f"{op} x{counts[op]}" for op in ("SE", "MR", "LI", "MHA")
                                  if counts[op]),
      "layers: " + " ".join(f"{i}:{op}" for i, op in enumerate(types)),
      f"FLOPs per token at L={seq_len}: forward {flops_per_token(cfg, seq_len, False):.4g}, "
      f"training {flops_per_token(cfg, seq_len, True):.4g}",
      "per-layer forward FLOPs per token: " + ", ".join(
          f"{op} {per_op[op]:.3g}" for op in ("SE", "MR", "LI", "MHA") if counts[op]),
  ]
  return "\n".join(lines)


def print_summary(config) -> None:
  """Print the summary of an ml_collections config (its ``model`` sub-dict) or a ModelConfig."""
  cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config.model)
  seq_len = getattr(config, "seq_len", None) if not isinstance(config, ModelConfig) else None
  print(summary(cfg, seq_len))
