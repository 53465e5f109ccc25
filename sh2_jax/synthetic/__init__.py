"""Synthetic token-manipulation tasks (associative recall, MQAR, multi-token recall, selective
copying, compression): seeded generators with answer masks, accuracy metrics, and a data source
for the trainer (``data.format = "synthetic:<task>[:k=v,...]"``). ``mad`` is the MAD suite
(Poli et al. 2024) with MAD's own vocabulary, settings and loss masks, trained by
``sh2_jax.train.mad_sweep``."""

from sh2_jax.synthetic.metrics import accuracy, accuracy_counts
from sh2_jax.synthetic.tasks import BASE, BLANK, END, SEP, TASKS, Example, TaskSpec

__all__ = ["accuracy", "accuracy_counts", "BASE", "BLANK", "END", "SEP", "TASKS", "Example",
           "TaskSpec"]
