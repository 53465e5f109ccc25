"""Deprecated: 'evo2_1b' is now 'evo2_1b_base' (the reference evo2 name); use configs/evo2_1b_base.py."""

from sh2_jax.configs.base import make_config


def get_config():
  return make_config("evo2_1b")  # warns once and builds 'evo2_1b_base'
