"""Checkout shim so that ``--config=configs/tiny.py`` works: the config is
``sh2_jax/configs/tiny.py``."""

from sh2_jax.configs.tiny import get_config  # noqa: F401
