"""Deprecated: 'evo2_7b_1m' is now 'evo2_7b' (the reference evo2 name); use configs/evo2_7b.py."""

from sh2_jax.configs.base import make_config


def get_config():
  return make_config("evo2_7b_1m")  # warns once and builds 'evo2_7b'
