"""The model zoo: named presets with their sizes, and ``load`` for presets and checkpoints.

  python -m sh2_jax.zoo list          # every preset: layers, width, parameters, cache sizes

``load(name_or_dir)``: a directory is an sh2_jax checkpoint (our training runs, or an Evo 2
checkpoint converted with ``python -m sh2_jax.convert``) read by ``checkpoint.load_model``; a
preset name builds that architecture with random weights (for tests and benchmarks), and says so.
Sizes come from abstract evaluation, so listing the 40B model allocates nothing.
"""

from __future__ import annotations

import collections
import os
import sys

from absl import logging

from sh2_jax.config import ModelConfig
from sh2_jax.flops import param_count
from sh2_jax.inference.cache import cache_bytes
from sh2_jax.presets import PRESETS, get_preset


def load(name_or_dir: str, dtype=None, seed: int = 0, **overrides):
  """A ``StripedHyena`` from a checkpoint directory or a preset name (random weights).

  dtype: compute dtype (e.g. 'bfloat16'); overrides: extra ModelConfig fields.
  """
  if os.path.isdir(name_or_dir):
    from sh2_jax.checkpoint import load_model
    return load_model(name_or_dir, dtype=dtype, **overrides)
  if name_or_dir in PRESETS:
    import jax.numpy as jnp
    from flax import nnx

    from sh2_jax.model import StripedHyena
    if dtype is not None:
      overrides["dtype"] = jnp.dtype(dtype).name
    cfg = get_preset(name_or_dir, **overrides)
    logging.warning("preset %r has no weights here: building it with RANDOM weights (seed %d). "
                    "Pass a checkpoint directory for a trained model (convert Evo 2 weights "
                    "with `python -m sh2_jax.convert`).", name_or_dir, seed)
    return StripedHyena(cfg, rngs=nnx.Rngs(seed))
  if os.path.exists(name_or_dir):
    raise ValueError(f"{name_or_dir!r} is not a directory; expected an sh2_jax checkpoint "
                     "directory or a preset name")
  raise ValueError(f"{name_or_dir!r} is neither a checkpoint directory nor a preset; presets: "
                   f"{', '.join(PRESETS)}")


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def preset_table(names=None, context: int = 8192) -> str:
  """A text table of presets: layer mix, width, parameters, bf16 weights, decode cache at
  ``context`` tokens (batch 1) against an all-attention model of the same shape."""
  rows = [("preset", "layers", "SE/MR/LI/MHA", "width", "params", "bf16 weights GiB",
           f"cache@{context // 1024}K GiB", "all-MHA KV GiB", "max ctx")]
  for name in names or PRESETS:
    cfg = get_preset(name, dtype="bfloat16")
    counts = collections.Counter(cfg.layer_types)
    n = param_count(cfg)
    mha_only = ModelConfig.from_dict({**cfg.to_dict(), "layout": "MHA", "layer_idxs": {}})
    rows.append((name, str(cfg.num_layers),
                 "/".join(str(counts[op]) for op in ("SE", "MR", "LI", "MHA")),
                 str(cfg.d_model), f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M",
                 _gib(2 * n), _gib(cache_bytes(cfg, 1, context)),
                 _gib(cache_bytes(mha_only, 1, context)), str(cfg.max_seqlen)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in ("list",):
    print("usage: python -m sh2_jax.zoo list [PRESET ...]", file=sys.stderr)
    return 2
  names = argv[1:] or None
  unknown = [n for n in names or () if n not in PRESETS]
  if unknown:
    print(f"unknown preset(s) {unknown}; expected some of {', '.join(PRESETS)}", file=sys.stderr)
    return 2
  print(preset_table(names))
  return 0


if __name__ == "__main__":
  sys.exit(main())
