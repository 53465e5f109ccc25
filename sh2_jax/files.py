"""Files written whole or not at all: the one place for the write-to-a-temporary-then-rename
rule that every command, checkpoint-side record and benchmark workdir uses. Imports nothing
of the package, so every layer can use it."""

from __future__ import annotations

import json
import os


def _temporary(path: str) -> str:
  """This process's temporary name beside ``path``, with the same extension (np.savez keeps
  the name as given)."""
  root, ext = os.path.splitext(path)
  return f"{root}.tmp{os.getpid()}{ext}"


def write_atomic(path: str, write) -> None:
  """``write(tmp)`` to a temporary file beside ``path`` (this process's own name, the same
  extension), then rename it onto ``path``: the output is complete or absent, never
  half-written. An exception from ``write`` leaves ``path`` as it was and removes ``tmp``."""
  tmp = _temporary(path)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes_atomic(blobs: dict[str, bytes]) -> None:
  """Several files that belong together (``{path: bytes}``): every one written to a temporary
  beside its path first, then all renamed one after the other, the first path last. A failure
  while writing leaves every old file as it was and no temporary; the old and the new set can
  only mix within the renames."""
  temps = {}
  try:
    for path, blob in blobs.items():
      temps[path] = _temporary(path)
      with open(temps[path], "wb") as f:
        f.write(blob)
    for path in reversed(list(blobs)):
      os.replace(temps.pop(path), path)
  finally:
    for tmp in temps.values():
      if os.path.exists(tmp):
        os.remove(tmp)


def write_json(path: str, obj, indent: int = 1) -> None:
  """``obj`` as JSON at ``path``, through ``write_atomic``."""
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=indent)
  write_atomic(path, write)
