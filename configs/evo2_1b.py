"""Checkout shim so that ``--config=configs/evo2_1b.py`` works (deprecated: use
``configs/evo2_1b_base.py``)."""

from sh2_jax.configs.evo2_1b import get_config  # noqa: F401
