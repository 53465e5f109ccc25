"""Checkout shim so that ``--config=configs/evo2_1b.py`` works: the config is
``sh2_jax/configs/evo2_1b.py``."""

from sh2_jax.configs.evo2_1b import get_config  # noqa: F401
