"""How every command starts: absl flags, quiet logs, and bad flags as one ``error:`` line.

``launch(main, module)`` parses the flags (an absl flag error becomes ``error: ...`` on stderr
and exit code 2, nothing else), lowers the log level to WARNING unless ``--verbosity`` was given
(absl's default INFO prints JAX's backend probe — ``Unable to initialize backend 'tpu'`` — and
Orbax's per-file notes on every run), and runs ``main(argv)``. This is the one place the
commands' log level is set.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS


def fail(message: str) -> None:
  """Bad input: one ``error:`` line on stderr, exit code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parse with its errors (unknown flag, bad value) as one ``error:`` line."""
  try:
    return FLAGS(list(argv))
  except flags.Error as e:  # absl's messages name the flag and the bad value
    fail(one_line(str(e)))


def one_line(message: str) -> str:
  """absl reports several missing or bad flags on several lines: join them with '; '."""
  return "; ".join(ln.strip() for ln in message.splitlines() if ln.strip())


def quiet_logs() -> None:
  """WARNING and above only, unless the user asked for a ``--verbosity``."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _adopt_help(module: str) -> None:
  """absl's ``--help`` prints ``__main__``'s docstring and the flags defined by ``__main__``;
  an installed command's ``__main__`` is a generated wrapper (and a checkout's ``train.py`` a
  shim), so point both at the command's module."""
  main = sys.modules["__main__"]
  main.__doc__ = sys.modules[module].__doc__
  for flag in FLAGS.get_key_flags_for_module(module):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def launch(main: Callable[[list[str]], None], module: str,
           flags_parser: Callable[[Sequence[str]], list[str]] = parse_flags,
           argv: list[str] | None = None) -> None:
  """Run ``main`` as the command defined in ``module`` (its ``__name__``); ``argv``: the whole
  command line (default ``sys.argv``)."""
  _adopt_help(module)

  def run(argv: list[str]) -> None:
    quiet_logs()
    main(argv)

  app.run(run, argv=argv, flags_parser=flags_parser)
