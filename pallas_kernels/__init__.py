"""Pallas GPU kernels for StripedHyena 2, each beside its plain-jnp reference."""
