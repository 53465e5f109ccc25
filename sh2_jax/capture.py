"""Capture of named intermediates through Flax NNX's own mechanism (``sow`` / ``nnx.capture``).

Every module records its output with ``record(self, value)`` as it returns: a ``sow`` of an
``nnx.Intermediate`` named ``output`` that does nothing outside ``nnx.capture``. ``run`` calls
a function of a module under ``nnx.capture`` and returns the outputs by module path
(``blocks.28.mlp.l3``). Because the modules record themselves, every forward that calls them
-- one-shot, segmented, context-parallel, rematerialised -- captures the same points; the one
walk that calls a block through a transformation (``jax.checkpoint``, the FSDP gather) captures
inside it and records the values back into the block (``resow``).
"""

from __future__ import annotations

import contextlib
import contextvars

from flax import nnx

OUTPUT = "output"
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("sh2_capture", default=False)


def _last(_, value):
  return value


def _none():
  return None


def record(module: nnx.Module, value, name: str = OUTPUT):
  """Sow ``value`` as ``module``'s output while a ``run`` captures (a no-op otherwise, on any
  Flax version: ``sow``'s ``capture_noop`` argument is recent); returns it."""
  if _ACTIVE.get():
    module.sow(nnx.Intermediate, name, value, reduce_fn=_last, init_fn=_none)
  return value


def active() -> bool:
  """Whether a ``run`` is capturing (the walk then captures through its transformations)."""
  return _ACTIVE.get()


@contextlib.contextmanager
def _activated():
  token = _ACTIVE.set(True)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def run(fn, module: nnx.Module, *args, **kwargs):
  """``fn(module, *args, **kwargs)`` under ``nnx.capture``: (result, {module path: output})."""
  with _activated():
    result, inter = nnx.capture(fn, nnx.Intermediate)(module, *args, **kwargs)
  return result, by_path(inter)


def run_inner(fn, module: nnx.Module, *args):
  """Inside a transformation: ``fn(module, *args)`` and the State of what it recorded (empty
  unless a ``run`` is capturing, so training carries nothing extra)."""
  if not active():
    return fn(module, *args), nnx.State({})
  return nnx.capture(fn, nnx.Intermediate)(module, *args)


def resow(module: nnx.Module, inter: nnx.State) -> None:
  """Record the values of ``inter`` (a State relative to ``module``, from ``run_inner``) into
  ``module``'s submodules, as if they had recorded them themselves."""
  for path, var in nnx.to_flat_state(inter):
    sub = module
    for key in path[:-1]:
      sub = sub[key] if isinstance(key, int) else getattr(sub, key)
    record(sub, var.get_value(), path[-1])


def by_path(inter: nnx.State) -> dict:
  """A captured State -> {'blocks.3.mlp.l3': value, ...} (the module path of each output)."""
  return {".".join(str(k) for k in path[:-1]): var.get_value()
          for path, var in nnx.to_flat_state(inter) if path[-1] == OUTPUT}
