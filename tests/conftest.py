"""Suite-wide setup: one JAX compilation cache for the processes that tests start.

Many tests start ``train.py``, ``generate.py`` and the other commands in subprocesses, often
several times with the same config (a run, its resume, its evaluation); each process would
compile the same programs again. The children share a persistent compilation cache in this
run's base temporary directory (shared by the xdist workers, new for every run), so a program is
compiled once per run and later processes load the executable. The test processes themselves
keep JAX's in-memory cache only: jax is imported before the variables are set, and
``CACHE_ENV`` lists them for a test that starts a child without the cache.
"""

from __future__ import annotations

import os

import pytest

CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_COMPILATION_CACHE_MAX_SIZE")


@pytest.fixture(scope="session", autouse=True)
def _subprocess_compilation_cache(tmp_path_factory, request):
  import jax  # noqa: F401 - this process reads the variables at import: before they are set
  if any(k in os.environ for k in CACHE_ENV):  # the caller's own cache settings stand
    yield
    return
  base = tmp_path_factory.getbasetemp()
  if hasattr(request.config, "workerinput"):  # an xdist worker: the run's directory above
    base = base.parent
  os.environ.update({
      "JAX_COMPILATION_CACHE_DIR": str(base / "jax_compilation_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the many small programs too
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
      # a size limit turns on the cache's file lock: concurrent processes never read an entry
      # that another is still writing
      "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 * 2**30)})
  yield
  for k in CACHE_ENV:
    os.environ.pop(k, None)
