"""Pallas GPU kernels for StripedHyena 2, each beside its plain-jnp reference."""

from pallas_kernels.fir_conv import gated_fir_conv, gated_fir_conv_reference

__all__ = ["gated_fir_conv", "gated_fir_conv_reference"]
