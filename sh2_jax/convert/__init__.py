"""Converters from reference checkpoints."""

from sh2_jax.convert.vortex import from_vortex

__all__ = ["from_vortex"]
