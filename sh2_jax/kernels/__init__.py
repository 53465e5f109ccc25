"""Kernels: each family with its plain-jnp reference and its VJP wiring."""
