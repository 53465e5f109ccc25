"""sh2-jax: StripedHyena 2 convolutional multi-hybrid language models in JAX/Flax."""

import os as _os

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)


def _xla_cpu_one_thread_per_op() -> None:
  """Work around a deadlock of XLA's CPU runtime (jax 0.11.2): independent FFTs of one jitted
  computation run concurrently on the intra-op Eigen pool, and each (ducc) splits its work into
  tasks on that same pool and waits on a latch; when every pool thread is such a waiting FFT (2
  threads on a 2-core machine), nothing runs the tasks and the step never finishes (seen in gdb:
  both ``tf_XLAEigen`` threads in ``ducc0::detail_threading::latch::wait``, the main thread in
  ``BlockUntilReady``; the tiny model's train step with vocab_size 100, and the 7-layer
  benchmark model). ``--xla_cpu_multi_thread_eigen=false`` runs each op on one thread (ops
  still run in parallel with each other). Takes effect when set before JAX's CPU client starts,
  so it lives here, the package's first import; GPU runs are unaffected; an explicit
  ``xla_cpu_multi_thread_eigen`` in XLA_FLAGS wins."""
  flags = _os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()


_xla_cpu_one_thread_per_op()

from sh2_jax.config import ModelConfig, resolve_layout  # noqa: E402
from sh2_jax.embed import embed, mean_pool  # noqa: E402
from sh2_jax.inference import generate, score, sequence_scores  # noqa: E402
from sh2_jax.inference.segmented import segmented_logits, segmented_score  # noqa: E402
from sh2_jax.model import StripedHyena  # noqa: E402
from sh2_jax.zoo import load  # noqa: E402

__all__ = ["__version__", "ModelConfig", "StripedHyena", "embed", "generate", "load", "mean_pool",
           "resolve_layout", "score", "segmented_logits", "segmented_score", "sequence_scores"]
