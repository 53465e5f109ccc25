"""Training and evaluation: mesh, optimizer, train step, metrics, checkpoints, the loops."""
