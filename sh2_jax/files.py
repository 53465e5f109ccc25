"""Files written whole or not at all: the one place for the write-to-a-temporary-then-rename
rule that every command, checkpoint-side record and benchmark workdir uses. Imports nothing
of the package, so every layer can use it."""

from __future__ import annotations

import json
import os


def write_atomic(path: str, write) -> None:
  """``write(tmp)`` to a temporary file beside ``path`` (this process's own name, the same
  extension), then rename it onto ``path``: the output is complete or absent, never
  half-written. An exception from ``write`` leaves ``path`` as it was and removes ``tmp``."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{os.getpid()}{ext}"  # same extension: np.savez keeps the name as given
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj, indent: int = 1) -> None:
  """``obj`` as JSON at ``path``, through ``write_atomic``."""
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=indent)
  write_atomic(path, write)
