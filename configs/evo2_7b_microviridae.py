"""Checkout shim so that ``--config=configs/evo2_7b_microviridae.py`` works: the config is
``sh2_jax/configs/evo2_7b_microviridae.py``."""

from sh2_jax.configs.evo2_7b_microviridae import get_config  # noqa: F401
