"""Checkout shim so that ``--config=configs/evo2_40b_base.py`` works: the config is
``sh2_jax/configs/evo2_40b_base.py``."""

from sh2_jax.configs.evo2_40b_base import get_config  # noqa: F401
