"""Checkout shim: ``python generate.py ...`` runs ``sh2-generate ...``
(``sh2_jax/cli/generate.py``, whose ``--help`` this prints)."""

from sh2_jax.cli.generate import main

if __name__ == "__main__":
  main()
