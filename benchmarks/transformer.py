"""The Transformer baseline of the benchmarks: the project's own model with every layer MHA.

Same width, depth, heads, MLP (gated, same hidden size and activations), norms, embedding and
dtypes as the StripedHyena 2 config it is derived from, so the only difference is the mixer.
"""

from __future__ import annotations

import dataclasses

from sh2_jax.config import ModelConfig
from sh2_jax.presets import evo2_layer_idxs, get_preset


def transformer_like(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with every layer MHA (layout 'MHA' repeated to ``num_layers``)."""
  return dataclasses.replace(cfg, layout="MHA", layer_idxs=())


def evo2_7b_layout(width: int = 4096, num_layers: int = 32, **overrides) -> ModelConfig:
  """The Evo 2 7B layout (SE-MR-LI-MHA-SE-MR-LI, MHA at 3, 10, 17, 24, 31) at another width or
  depth: heads of 128, MLP hidden and filter groups scaled with the width (group size 16
  channels, MLP 11008 x width / 4096 rounded to 64), MHA every 7th layer from layer 3."""
  if width % 128 or width < 128:
    raise ValueError(f"width {width} must be a positive multiple of 128 (heads of 128)")
  mha = tuple(range(3, num_layers, 7))
  mlp = max(64, round(11008 * width / 4096 / 64) * 64)
  return get_preset("evo2_7b_base", d_model=width, num_heads=width // 128, mlp_hidden=mlp,
                    se_groups=width // 16, mr_groups=width // 16, num_layers=num_layers,
                    layer_idxs=evo2_layer_idxs(num_layers, mha), **overrides)
