"""Checkout shim so that ``--config=configs/evo2_40b.py`` works: the config is
``sh2_jax/configs/evo2_40b.py``."""

from sh2_jax.configs.evo2_40b import get_config  # noqa: F401
