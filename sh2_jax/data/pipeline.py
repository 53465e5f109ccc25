"""Grain pipelines over packed windows.

Training: shuffle (reshuffled every epoch from ``seed``) -> repeat forever -> batches of the
per-process batch; process p of P takes local batches p, p + P, ..., so step s of the global
batch holds the shuffled windows ``[s B, (s + 1) B)``, process p the rows ``[p B/P, (p+1) B/P)``
— the same global batch whatever the number of processes. The iterator's state (one index)
goes into every checkpoint, so a resumed run reads exactly the batches an uninterrupted run
would have read.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from sh2_jax.data.packing import PackedWindows, num_windows, pack_documents, split_windows
from sh2_jax.data.readers import default_corpus_path, read_documents
from sh2_jax.synthetic.data import is_synthetic, load_synthetic


def load_dataset(data_cfg, seq_len: int) -> tuple[PackedWindows, PackedWindows]:
  """``config.data`` -> (train windows, held-out windows). Raises ValueError naming the bad
  path or value (missing path, empty file, FASTA without sequences, ...)."""
  if is_synthetic(data_cfg.format):  # "synthetic:<task>[:k=v,...]": generated tasks (issue 9)
    return load_synthetic(data_cfg, seq_len)
  path = data_cfg.path or default_corpus_path()
  docs = read_documents(path, data_cfg.format, data_cfg.upper_case, data_cfg.n_handling)
  stream = pack_documents(docs)
  n = num_windows(len(stream), seq_len)
  train_ids, eval_ids = split_windows(n, data_cfg.eval_fraction)
  return PackedWindows(stream, seq_len, train_ids), PackedWindows(stream, seq_len, eval_ids)


def _read_options() -> grain.ReadOptions:
  # A couple of threads suffice: a window is a slice of an in-memory array.
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def train_iterator(source: PackedWindows, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Endless iterator of this process's rows of each global batch (dict of [B/P, L] arrays)."""
  if len(source) == 0:
    raise ValueError("the training split is empty: the data has too few tokens for one window "
                     f"of seq_len {source.seq_len} outside the held-out split; lower "
                     "data.eval_fraction or seq_len, or give more data")
  local = global_batch // process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  return iter(ds.to_iter_dataset(_read_options()))


def eval_batches(source: PackedWindows, global_batch: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """All held-out windows in order, in this process's rows of global batches; the last batch is
  filled with zero-weight windows. ``max_batches`` > 0 stops early."""
  if len(source) == 0:
    raise ValueError("the held-out split is empty; raise data.eval_fraction (1.0 evaluates on "
                     "the whole dataset) or give more data")
  ids = source.ids
  pad = -len(ids) % global_batch
  ids = np.concatenate([ids, -np.ones(pad, np.int64)])
  n_batches = len(ids) // global_batch
  if max_batches > 0:
    n_batches = min(n_batches, max_batches)
  padded = source.with_ids(ids[:n_batches * global_batch])
  local = global_batch // process_count
  ds = grain.MapDataset.source(padded).batch(local)[process_index::process_count]
  return iter(ds.to_iter_dataset(_read_options()))


def num_eval_batches(source: PackedWindows, global_batch: int, max_batches: int = 0) -> int:
  n = -(-len(source) // global_batch)
  return min(n, max_batches) if max_batches > 0 else n
