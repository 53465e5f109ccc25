"""Checkout shim: the shared config lives in ``sh2_jax/configs/base.py``."""

from sh2_jax.configs.base import make_config  # noqa: F401
