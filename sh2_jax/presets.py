"""Named model presets: one entry per model in one table.

Evo 2 layouts stripe SE, MR, LI and restart the stripe after every MHA layer
(SE-MR-LI-MHA-SE-MR-LI ...); the 40B model breaks the period with an MHA at layer 35.
"""

from __future__ import annotations

from sh2_jax.config import ModelConfig


def evo2_layer_idxs(num_layers: int, mha: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  """Per-type index lists: MHA at ``mha``, SE/MR/LI cycling in between, restarting after MHA."""
  idxs: dict[str, list[int]] = {"SE": [], "MR": [], "LI": [], "MHA": []}
  k = 0
  for i in range(num_layers):
    if i in mha:
      idxs["MHA"].append(i)
      k = 0
    else:
      idxs[("SE", "MR", "LI")[k % 3]].append(i)
      k += 1
  return {op: tuple(v) for op, v in idxs.items()}


def _evo2(num_layers, d_model, mha, groups, mlp_hidden, rope_base, **kw) -> dict:
  return dict(d_model=d_model, num_layers=num_layers, layout=None,
              layer_idxs=evo2_layer_idxs(num_layers, mha), num_heads=d_model // 128,
              mlp_hidden=mlp_hidden, se_groups=groups, mr_groups=groups, rope_base=rope_base,
              evo2_style_activations=True, mr_decay="weak", **kw)


PRESETS: dict[str, dict] = {
    # Runs on a laptop CPU in seconds; the README's main job trains it.
    "tiny": dict(d_model=128, num_layers=4, layout="SE-MR-LI-MHA", num_heads=2, mlp_hidden=256,
                 se_groups=8, mr_groups=8, max_seqlen=256),
    # The released 1B, 20B and 40B ran their Hyena input projections in FP8; 7B did not.
    "evo2_1b": _evo2(25, 1920, (3, 10, 17, 24), 128, 5120, 1e4,
                     fp8_projections="current_scaling"),
    "evo2_7b": _evo2(32, 4096, (3, 10, 17, 24, 31), 256, 11008, 1e4),
    "evo2_7b_1m": _evo2(32, 4096, (3, 10, 17, 24, 31), 256, 11264, 1e4,
                        rope_scale=128.0, max_seqlen=1 << 20),
    "evo2_20b": _evo2(24, 8192, (3, 10, 17), 512, 22528, 1e6, fp8_projections="current_scaling"),
    "evo2_40b": _evo2(50, 8192, (3, 10, 17, 24, 31, 35, 42, 49), 512, 21888, 1e6,
                      fp8_projections="current_scaling"),
    "evo2_40b_1m": _evo2(50, 8192, (3, 10, 17, 24, 31, 35, 42, 49), 512, 22528, 1e6,
                         rope_scale=128.0, max_seqlen=1 << 20, fp8_projections="current_scaling"),
    # A plain SE-MR-LI-MHA stripe at the 7B shape.
    "sh2_7b": dict(d_model=4096, num_layers=32, layout="SE-MR-LI-MHA", num_heads=32,
                   mlp_hidden=11008, se_groups=256, mr_groups=256),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
  return ModelConfig.from_dict({**PRESETS[name], **overrides})
