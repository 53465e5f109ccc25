"""Checkout shim: ``python train.py ...`` runs ``sh2-train ...`` (``sh2_jax/cli/train.py``,
whose ``--help`` this prints), e.g. ``python train.py --config=configs/tiny.py --workdir=W``."""

from sh2_jax.cli.train import main

if __name__ == "__main__":
  main()
