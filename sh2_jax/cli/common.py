"""What sh2-generate, sh2-score and sh2-embed share (besides ``launch.py``): the checks of input
and output paths that run before a model is loaded, and writing the output all at once at the
end.

The commands define their flags when run (``main``), not when imported, so several command
modules can be imported into one process."""

from __future__ import annotations

import os

from sh2_jax.config import DTYPES  # the one list; float16 needs a GPU (sh2_jax.checks.backend)
from sh2_jax.files import write_atomic


def check_input_file(flag: str, path: str | None) -> None:
  if not path:
    raise ValueError(f"--{flag} is required")
  if not os.path.exists(path):
    raise ValueError(f"--{flag} {path!r} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"--{flag} {path!r} is not a file")


def check_output_file(flag: str, path: str | None, suffix: str | None = None) -> None:
  """The output's folder must exist and the path must not be a folder (checked up front, so a
  long run never ends in an unwritable path)."""
  if not path:
    raise ValueError(f"--{flag} is required")
  if os.path.isdir(path):
    raise ValueError(f"--{flag} {path!r} is a directory; give a file name")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"--{flag} {path!r}: the directory {folder!r} does not exist")
  if suffix is not None and not path.endswith(suffix):
    raise ValueError(f"--{flag} {path!r} must end in {suffix}")


def check_new_dir(flag: str, path: str | None) -> None:
  """A directory the command creates: it must not exist yet, and the nearest existing folder
  above it must be a directory it can write to (checked up front, so a conversion never ends
  in an unwritable path)."""
  if not path:
    raise ValueError(f"--{flag} is required")
  if os.path.exists(path):
    raise ValueError(f"--{flag} {path!r} already exists; choose a new directory")
  above = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    raise ValueError(f"--{flag} {path!r}: {above!r} is a file, not a directory")
  if not os.access(above, os.W_OK):
    raise ValueError(f"--{flag} {path!r}: the directory {above!r} is not writable")


def check_positive(flag: str, value: int | None, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if value is None or value < 1:
    raise ValueError(f"--{flag} {value} is not valid; expected an integer >= 1")


def check_dtype(value: str | None) -> None:
  if value is not None and value not in DTYPES:
    raise ValueError(f"--dtype {value!r} is not valid; expected one of {', '.join(DTYPES)}")


def write_text(path: str, lines) -> None:
  """Text lines (or chunks), written all at once through ``write_atomic``."""
  def write(tmp):
    with open(tmp, "w") as out:
      out.writelines(lines)
  write_atomic(path, write)


def record_names(records: list[tuple[str, bytes]]) -> list[str]:
  """Record names for output: the header's first word, ``record_N`` (1-based) when empty."""
  return [name or f"record_{i + 1}" for i, (name, _) in enumerate(records)]
