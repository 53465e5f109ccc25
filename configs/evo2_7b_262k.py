"""Checkout shim so that ``--config=configs/evo2_7b_262k.py`` works: the config is
``sh2_jax/configs/evo2_7b_262k.py``."""

from sh2_jax.configs.evo2_7b_262k import get_config  # noqa: F401
