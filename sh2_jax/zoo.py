"""The model zoo: named presets with their sizes, and ``load`` for names and checkpoints.

  python -m sh2_jax.zoo list          # every preset: context, layers, width, parameters, caches

``load(name_or_dir)``:
  * a directory is an sh2_jax checkpoint (our training runs, or an Evo 2 checkpoint converted
    with ``sh2-convert`` / ``python -m sh2_jax.convert``), read by ``checkpoint.load_model``;
  * a released model's name (``evo2_7b_base``, ``evo2_7b``, ... as in the reference ``evo2``
    package; ``presets.RELEASES``) loads its weights: converted from a local cache, else
    converted once from the Hugging Face hub (``sh2_jax.hub``); without weights it is one error
    saying what to download, never random weights;
  * ``random:NAME`` (or ``random_init=True``) builds preset NAME with random weights, for tests
    and benchmarks; the presets nothing was released for (``tiny``, ``sh2_7b``) mean exactly
    that and are built the same way. Both say so in a warning.
Deprecated names (``evo2_7b_1m``, ``evo2_1b``, ...) warn once and map to the reference names.
Sizes come from abstract evaluation, so listing the 40B model allocates nothing.
"""

from __future__ import annotations

import collections
import os
import sys

from absl import logging

from sh2_jax import checks
from sh2_jax.config import ModelConfig
from sh2_jax.flops import param_count
from sh2_jax.inference.cache import cache_bytes
from sh2_jax.presets import DEPRECATED, PRESETS, RELEASES, get_preset, resolve_name

RANDOM_PREFIX = "random:"


def _names() -> str:
  return (f"released: {', '.join(RELEASES)}; architectures only: "
          f"{', '.join(n for n in PRESETS if n not in RELEASES)}; or random:NAME")


def load(name_or_dir: str, dtype=None, seed: int = 0, random_init: bool = False,
         local_files_only: bool | None = None, **overrides):
  """A ``StripedHyena`` from a checkpoint directory, a model name or ``random:NAME``.

  dtype: compute dtype (e.g. 'bfloat16'); random_init: preset weights drawn from ``seed``
  instead of released ones; local_files_only: never download (default: ``HF_HUB_OFFLINE``);
  overrides: extra ModelConfig fields.
  """
  if os.path.isdir(name_or_dir):
    from sh2_jax.checkpoint import load_model
    return load_model(name_or_dir, dtype=dtype, **overrides)
  name = name_or_dir
  if name.startswith(RANDOM_PREFIX):
    name, random_init = name[len(RANDOM_PREFIX):], True
  if random_init or name in PRESETS or name in DEPRECATED:
    name = resolve_name(name)  # an unknown name after random: is an error listing the presets
    if name in RELEASES and not random_init:
      from sh2_jax.hub import load_released
      return load_released(name, dtype=dtype, local_files_only=local_files_only, **overrides)
    return _random_model(name, dtype, seed, **overrides)
  if os.path.exists(name_or_dir):
    raise ValueError(f"{name_or_dir!r} is not a directory; expected an sh2_jax checkpoint "
                     f"directory or a model name ({_names()})")
  raise ValueError(f"{name_or_dir!r} is neither a checkpoint directory nor a model name; "
                   f"{_names()}")


def _random_model(name: str, dtype, seed: int, **overrides):
  import jax.numpy as jnp
  from flax import nnx

  from sh2_jax.model import StripedHyena
  if dtype is not None:
    overrides["dtype"] = jnp.dtype(dtype).name
  cfg = get_preset(name, **overrides)
  checks.model(cfg, hint=checks.LOAD_HINT)  # before building it
  logging.warning("preset %r: building it with RANDOM weights (seed %d). Pass a checkpoint "
                  "directory or a released model's name (%s) for trained weights.", name, seed,
                  ", ".join(RELEASES))
  return StripedHyena(cfg, rngs=nnx.Rngs(seed))


def _tokens(n: int) -> str:
  return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else (
      f"{n >> 10}K" if n % 1024 == 0 else str(n))


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def preset_table(names=None, context: int = 8192) -> str:
  """A text table of presets: the context a released model was trained for (else the preset's
  max_seqlen), layer mix, width, parameters, bf16 weights, decode cache at ``context`` tokens
  (batch 1) against an all-attention model of the same shape, and where the weights come from."""
  rows = [("preset", "context", "layers", "SE/MR/LI/MHA", "width", "params", "bf16 weights GiB",
           f"cache@{context // 1024}K GiB", "all-MHA KV GiB", "max ctx", "weights")]
  for name in names or PRESETS:
    cfg = get_preset(name, dtype="bfloat16")
    counts = collections.Counter(cfg.layer_types)
    n = param_count(cfg)
    mha_only = ModelConfig.from_dict({**cfg.to_dict(), "layout": "MHA", "layer_idxs": {}})
    ctx = RELEASES[name].context if name in RELEASES else cfg.max_seqlen
    rows.append((name, _tokens(ctx), str(cfg.num_layers),
                 "/".join(str(counts[op]) for op in ("SE", "MR", "LI", "MHA")),
                 str(cfg.d_model), f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M",
                 _gib(2 * n), _gib(cache_bytes(cfg, 1, context)),
                 _gib(cache_bytes(mha_only, 1, context)), str(cfg.max_seqlen),
                 RELEASES[name].repo if name in RELEASES else "none (random:NAME)"))
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
  unknown = [n for n in names or () if n not in PRESETS and n not in DEPRECATED]
  if unknown:
    print(f"error: unknown preset(s) {unknown}; expected some of {', '.join(PRESETS)}",
          file=sys.stderr)
    return 2
  print(preset_table([resolve_name(n) for n in names] if names else None))
  return 0


if __name__ == "__main__":
  sys.exit(main())
