"""The shared ml_collections config: a model preset plus the training/eval defaults.

Every ``configs/<name>.py`` calls ``make_config(<preset>)``; override anything from the command
line with ``--config.key=value`` (e.g. ``--config.model.d_model=256``).
"""

from __future__ import annotations

import ml_collections

from sh2_jax.presets import PRESETS


def make_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = ml_collections.ConfigDict(dict(PRESETS[preset]))
  # Training (Flax-examples style top-level keys).
  c.seed = 0
  c.num_steps = 200
  c.log_every = 10
  c.checkpoint_every = 100
  c.eval_every = 100
  c.batch_size = 8
  c.seq_len = 256
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
      eps=1e-8, grad_clip=1.0, grad_accum_steps=1))
  c.remat = "none"
  c.data = ml_collections.ConfigDict(dict(path="", format="auto", eval_fraction=0.05))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1))
  c.keep_checkpoints = 3
  return c
