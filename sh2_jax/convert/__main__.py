"""``python -m sh2_jax.convert ...`` runs ``sh2-convert ...`` (``sh2_jax/cli/convert.py``)."""

from sh2_jax.cli.convert import main

if __name__ == "__main__":
  main()
