"""Preset 'evo2_40b_base' (see sh2_jax/presets.py) with the default training setup."""

from sh2_jax.configs.base import make_config


def get_config():
  return make_config("evo2_40b_base")
