"""Checkout shim so that ``--config=configs/synthetic_mqar.py`` works: the config is
``sh2_jax/configs/synthetic_mqar.py``."""

from sh2_jax.configs.synthetic_mqar import get_config  # noqa: F401
