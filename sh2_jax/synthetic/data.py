"""Synthetic tasks as training data: ``config.data.format = "synthetic:<task>[:k=v,...]"``.

    sh2-train --config=synthetic_mqar --workdir=runs/mqar
    sh2-train --config=tiny --workdir=runs/sc \\
        --config.data.format=synthetic:selective_copy:n_tokens=8,vocab=16

The parameters after the task name are the generator's keyword arguments (``tasks.py``) plus
``n_eval`` (held-out examples, default 512) and ``seed`` (of the examples, default 0; the
training order still follows ``config.seed``). ``seq_len`` is ``config.seq_len``.
Items carry ``weights`` = the answer mask, so the trainer's weighted loss is the loss on the
answer tokens only.
"""

from __future__ import annotations

import numpy as np

from sh2_jax.synthetic.tasks import TASKS, TaskSpec

PREFIX = "synthetic:"
TRAIN_SIZE = 1 << 40  # examples are generated on demand: an effectively endless split
DEFAULT_EVAL = 512


def is_synthetic(fmt: str) -> bool:
  return isinstance(fmt, str) and fmt.startswith(PREFIX)


def parse_format(fmt: str, seq_len: int, seed: int = 0) -> tuple[TaskSpec, int]:
  """``"synthetic:mqar:n_pairs=8,vocab=32"`` -> (TaskSpec, n_eval); ValueError naming the bad
  part otherwise."""
  if not is_synthetic(fmt):
    raise ValueError(f"data.format {fmt!r} is not a synthetic format ('{PREFIX}<task>[:k=v,...]')")
  task, _, rest = fmt[len(PREFIX):].partition(":")
  if task not in TASKS:
    raise ValueError(f"data.format {fmt!r} names unknown synthetic task {task!r}; expected one "
                     f"of {', '.join(TASKS)}")
  params: dict[str, int] = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    try:
      if not eq:
        raise ValueError
      params[key.strip()] = int(value)
    except ValueError:
      raise ValueError(f"data.format {fmt!r}: parameter {item!r} is not key=integer") from None
  n_eval = params.pop("n_eval", DEFAULT_EVAL)
  seed = params.pop("seed", seed)
  if n_eval < 1:
    raise ValueError(f"data.format {fmt!r}: n_eval {n_eval} must be a positive integer")
  return TaskSpec.make(task, seq_len, seed, **params), n_eval


class SyntheticExamples:
  """A Grain random-access source: item ``i`` is example ``ids[i]`` of ``split`` as
  ``{"inputs", "targets", "weights"}`` ([L] int32, int32, float32); id -1 is an all-PAD
  example of weight 0 (rounds eval sets up to whole batches, as ``PackedWindows`` does).
  ``with_query_ids`` adds the [L] ``query_ids`` (for accuracy; the train step takes only the
  three arrays)."""

  def __init__(self, spec: TaskSpec, split: str, ids=None, size: int = 0,
               with_query_ids: bool = False):
    self.spec, self.split, self.with_query_ids = spec, split, with_query_ids
    self.seq_len = spec.seq_len
    self.ids = None if ids is None else np.asarray(ids, np.int64)
    self._size = size if ids is None else len(self.ids)

  def __len__(self) -> int:
    return self._size

  def with_ids(self, ids) -> "SyntheticExamples":
    return SyntheticExamples(self.spec, self.split, ids, with_query_ids=self.with_query_ids)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    k = int(i) if self.ids is None else int(self.ids[i])
    if k < 0:
      item = {"inputs": np.full(self.seq_len, 1, np.int32),
              "targets": np.full(self.seq_len, 1, np.int32),
              "weights": np.zeros(self.seq_len, np.float32),
              "query_ids": np.full(self.seq_len, -1, np.int32)}
    else:
      item = self.spec.example(self.split, k).as_dict()
    if not self.with_query_ids:
      item.pop("query_ids")
    return item

  def __repr__(self) -> str:
    return (f"SyntheticExamples({self.spec.task}, {self.split}, size={len(self)}, "
            f"seq_len={self.seq_len})")


def load_synthetic(data_cfg, seq_len: int):
  """``config.data`` with a synthetic format -> (train source, eval source)."""
  if data_cfg.path:
    raise ValueError(f"data.path {data_cfg.path!r} is not used by data.format "
                     f"{data_cfg.format!r}; leave it empty")
  spec, n_eval = parse_format(data_cfg.format, seq_len)
  return (SyntheticExamples(spec, "train", size=TRAIN_SIZE),
          SyntheticExamples(spec, "eval", ids=np.arange(n_eval)))
