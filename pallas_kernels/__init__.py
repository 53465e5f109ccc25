"""Pallas GPU kernels for StripedHyena 2, each beside its plain-jnp reference."""

from pallas_kernels.fir_conv import gated_fir_conv, gated_fir_conv_reference
from pallas_kernels.modal_scan import gated_modal_scan

__all__ = ["gated_fir_conv", "gated_fir_conv_reference", "gated_modal_scan"]
