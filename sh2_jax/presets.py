"""Named model presets: one entry per model in one table, under the reference ``evo2`` names.

Evo 2 layouts stripe SE, MR, LI and restart the stripe after every MHA layer
(SE-MR-LI-MHA-SE-MR-LI ...); the 40B model breaks the period with an MHA at layer 35.

The Evo 2 names mean what they mean in the reference ``evo2`` package: ``evo2_7b`` is the
1M-context 7B (``evo2-7b-1m.yml``), ``evo2_7b_base`` the 8K one (``evo2-7b-8k.yml``), and so
on (``RELEASES`` pairs each with its Hugging Face repository and reference config). Each preset
holds exactly the shapes and numerics of that config. Older names of this package are
deprecated aliases (``DEPRECATED``): they warn once and map to the new name. Two old names
changed meaning instead: ``evo2_7b`` and ``evo2_40b`` used to be the 8K models and are now the
1M-context ones, as in the reference (the 8K ones are ``evo2_7b_base`` / ``evo2_40b_base``).
"""

from __future__ import annotations

import dataclasses
import warnings

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


def _evo2(num_layers, d_model, mha, groups, mlp_hidden, rope_base, max_seqlen, **kw) -> dict:
  return dict(d_model=d_model, num_layers=num_layers, layout=None,
              layer_idxs=evo2_layer_idxs(num_layers, mha), num_heads=d_model // 128,
              mlp_hidden=mlp_hidden, se_groups=groups, mr_groups=groups, rope_base=rope_base,
              evo2_style_activations=True, mr_decay="weak", max_seqlen=max_seqlen, **kw)


_MHA_7B = (3, 10, 17, 24, 31)
_MHA_40B = (3, 10, 17, 24, 31, 35, 42, 49)
_1M = 1 << 20
# The released 1B, 20B and 40B need their Hyena input projections in FP8 (Transformer Engine)
# for their accuracy; the 7B models run in bf16 (the reference falls back to bf16 for them).
_FP8 = dict(fp8_projections="current_scaling")

PRESETS: dict[str, dict] = {
    # Runs on a laptop CPU in seconds; the README's main job trains it.
    "tiny": dict(d_model=128, num_layers=4, layout="SE-MR-LI-MHA", num_heads=2, mlp_hidden=256,
                 se_groups=8, mr_groups=8, max_seqlen=256),
    "evo2_1b_base": _evo2(25, 1920, (3, 10, 17, 24), 128, 5120, 1e4, 8192, **_FP8),
    "evo2_7b_base": _evo2(32, 4096, _MHA_7B, 256, 11008, 1e4, 32768),
    "evo2_7b_262k": _evo2(32, 4096, _MHA_7B, 256, 11008, 1e4, 262144, rope_scale=32.0),
    "evo2_7b": _evo2(32, 4096, _MHA_7B, 256, 11264, 1e4, _1M, rope_scale=128.0),
    # evo2_7b_base fine-tuned on Microviridae genomes: the same architecture.
    "evo2_7b_microviridae": _evo2(32, 4096, _MHA_7B, 256, 11008, 1e4, 32768),
    "evo2_20b": _evo2(24, 8192, (3, 10, 17), 512, 22528, 1e6, _1M, rope_scale=128.0, **_FP8),
    "evo2_40b_base": _evo2(50, 8192, _MHA_40B, 512, 21888, 1e6, 8192, **_FP8),
    "evo2_40b": _evo2(50, 8192, _MHA_40B, 512, 22528, 1e6, _1M, rope_scale=128.0, **_FP8),
    # A plain SE-MR-LI-MHA stripe at the 7B shape.
    "sh2_7b": dict(d_model=4096, num_layers=32, layout="SE-MR-LI-MHA", num_heads=32,
                   mlp_hidden=11008, se_groups=256, mr_groups=256),
}


@dataclasses.dataclass(frozen=True)
class Release:
  """Where a preset's released weights live: the Hugging Face repository, the reference's file
  name (``<file>``, or ``<file>.partN`` byte shards), the reference config it is paired with,
  and the context it was trained for."""
  repo: str
  reference_config: str
  context: int
  file: str = ""  # default: "<name>.pt"

  def filename(self, name: str) -> str:
    return self.file or f"{name}.pt"


RELEASES: dict[str, Release] = {
    "evo2_1b_base": Release("arcinstitute/evo2_1b_base", "evo2-1b-8k.yml", 8192),
    "evo2_7b_base": Release("arcinstitute/evo2_7b_base", "evo2-7b-8k.yml", 8192),
    "evo2_7b_262k": Release("arcinstitute/evo2_7b_262k", "evo2-7b-262k.yml", 262144),
    "evo2_7b": Release("arcinstitute/evo2_7b", "evo2-7b-1m.yml", _1M),
    "evo2_7b_microviridae": Release("evo-design/evo-2-7b-8k-microviridae", "evo2-7b-8k.yml", 8192),
    "evo2_20b": Release("arcinstitute/evo2_20b", "evo2-20b-1m.yml", _1M),
    "evo2_40b_base": Release("arcinstitute/evo2_40b_base", "evo2-40b-8k.yml", 8192),
    "evo2_40b": Release("arcinstitute/evo2_40b", "evo2-40b-1m.yml", _1M),
}

# Old names of this package -> the reference name of the same model (warned once per process).
DEPRECATED: dict[str, str] = {
    "evo2_1b": "evo2_1b_base",
    "evo2_7b_1m": "evo2_7b",
    "evo2_40b_1m": "evo2_40b",
}
_warned: set[str] = set()


def resolve_name(name: str) -> str:
  """A preset name, with a deprecated alias mapped to its new name (a FutureWarning, once)."""
  if name in DEPRECATED:
    new = DEPRECATED[name]
    if name not in _warned:
      _warned.add(name)
      warnings.warn(f"model name {name!r} is deprecated; use {new!r} (the reference evo2 "
                    "package's name for the same model)", FutureWarning, stacklevel=3)
    return new
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)} "
                     f"(deprecated: {', '.join(DEPRECATED)})")
  return name


def get_preset(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of preset ``name`` (or a deprecated alias) with ``overrides``."""
  return ModelConfig.from_dict({**PRESETS[resolve_name(name)], **overrides})


def matching_presets(model_cfg: ModelConfig | dict) -> list[str]:
  """The presets whose parameter shapes equal those of ``model_cfg`` (a config or its dict)."""
  from sh2_jax.config import shape_diffs
  d = model_cfg.to_dict() if isinstance(model_cfg, ModelConfig) else dict(model_cfg)
  return [n for n in PRESETS if not shape_diffs(get_preset(n).to_dict(), d)]
