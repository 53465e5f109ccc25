"""Recording module outputs by their reference module path (``blocks.28.mlp.l3``).

Modules call ``record(self, output)`` as they return; outside a ``capturing`` block this does
nothing. ``sh2_jax.embed`` uses it to return activations at named points of the forward pass.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_ACTIVE: contextvars.ContextVar[tuple[dict[int, str], dict[str, jax.Array]] | None] = (
    contextvars.ContextVar("sh2_capture", default=None))


def record(module, value: jax.Array) -> jax.Array:
  active = _ACTIVE.get()
  if active is not None:
    name = active[0].get(id(module))
    if name is not None:
      active[1][name] = value
  return value


@contextlib.contextmanager
def capturing(targets: dict[int, str]) -> Iterator[dict[str, jax.Array]]:
  """Within the block, outputs of the modules ``targets`` (id -> name) land in the dict."""
  out: dict[str, jax.Array] = {}
  token = _ACTIVE.set((targets, out))
  try:
    yield out
  finally:
    _ACTIVE.reset(token)
