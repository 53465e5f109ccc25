"""Accuracy of synthetic tasks: exact match per answer token and per query."""

from __future__ import annotations

import numpy as np


def accuracy_counts(predictions, targets, weights, query_ids) -> dict[str, int]:
  """predictions/targets/query_ids [B, L] int, weights [B, L] (1 on answer tokens) ->
  counts ``tokens``, ``tokens_correct``, ``queries``, ``queries_correct``. A query is correct
  when every one of its answer tokens is."""
  pred, tgt = np.asarray(predictions), np.asarray(targets)
  w, q = np.asarray(weights) > 0, np.asarray(query_ids)
  if not (pred.shape == tgt.shape == w.shape == q.shape) or pred.ndim != 2:
    raise ValueError(f"predictions {pred.shape}, targets {tgt.shape}, weights {w.shape} and "
                     f"query_ids {q.shape} must be the same [batch, length] shape")
  if np.any(w & (q < 0)):
    raise ValueError("an answer position (weight > 0) has query id -1")
  right = (pred == tgt) & w
  n_q = int(q.max()) + 1 if q.size else 0
  if n_q == 0:
    return {"tokens": 0, "tokens_correct": 0, "queries": 0, "queries_correct": 0}
  rows = np.broadcast_to(np.arange(q.shape[0])[:, None], q.shape)
  present = np.zeros((q.shape[0], n_q), bool)
  wrong = np.zeros((q.shape[0], n_q), bool)
  present[rows[w], q[w]] = True
  np.logical_or.at(wrong, (rows[w], q[w]), ~right[w])
  return {"tokens": int(w.sum()), "tokens_correct": int(right.sum()),
          "queries": int(present.sum()), "queries_correct": int((present & ~wrong).sum())}


def accuracy(predictions, targets, weights, query_ids) -> dict[str, float]:
  """``token_acc`` and ``query_acc`` (fractions) of one batch; see ``accuracy_counts``."""
  return summarize(accuracy_counts(predictions, targets, weights, query_ids))


def summarize(counts: dict[str, int]) -> dict[str, float]:
  return {"token_acc": counts["tokens_correct"] / max(counts["tokens"], 1),
          "query_acc": counts["queries_correct"] / max(counts["queries"], 1)}


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
  return {k: a.get(k, 0) + b[k] for k in b}
