"""Synthetic token-manipulation tasks (associative recall, MQAR, multi-token recall, selective
copying, compression): seeded generators with answer masks, accuracy metrics, and a data source
for the trainer (``data.format = "synthetic:<task>[:k=v,...]"``)."""

from sh2_jax.synthetic.metrics import accuracy, accuracy_counts
from sh2_jax.synthetic.tasks import BASE, BLANK, END, SEP, TASKS, Example, TaskSpec

__all__ = ["accuracy", "accuracy_counts", "BASE", "BLANK", "END", "SEP", "TASKS", "Example",
           "TaskSpec"]
