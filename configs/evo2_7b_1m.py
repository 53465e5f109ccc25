"""Checkout shim so that ``--config=configs/evo2_7b_1m.py`` works (deprecated: use
``configs/evo2_7b.py``)."""

from sh2_jax.configs.evo2_7b_1m import get_config  # noqa: F401
