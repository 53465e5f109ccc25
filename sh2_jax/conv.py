"""Transitional: the convolution math moved to ``sh2_jax.ops.fir`` and ``sh2_jax.ops.modal``.
Only the kernels (``pallas_kernels/``) still import it here, until they move under
``sh2_jax/kernels/`` and import ``ops`` directly."""

from sh2_jax.ops.fir import *  # noqa: F401,F403
from sh2_jax.ops.fir import MR_DECAY_PRESETS  # noqa: F401
from sh2_jax.ops.modal import *  # noqa: F401,F403
