"""Preset 'tiny' trained on multi-query associative recall (issue 9).

The loss is on the answer tokens only (the synthetic source's ``weights``); any synthetic task
works the same way, e.g. ``--config.data.format=synthetic:selective_copy:n_tokens=16``
(``sh2_jax/synthetic/data.py`` lists the format). Accuracy per answer token and per query:
``sh2_jax.synthetic.metrics`` / ``benchmarks/synthetic.py``.
"""

from sh2_jax.configs.base import make_config


def get_config():
  c = make_config("tiny")
  c.seq_len = 64
  c.batch_size = 32
  c.num_steps = 2000
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 500
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.data.format = "synthetic:mqar:n_pairs=8,vocab=16,n_eval=256"
  return c
