"""Pack documents into one token stream and cut it into fixed-length training windows.

stream = doc_0 EOD doc_1 EOD ... (byte ids, ``EOD_ID`` after every document). Window k holds
``stream[k L : k L + L + 1]``: ``inputs`` are its first L tokens, ``targets`` the next-token
shift. A document longer than the context simply continues in the next window; the final
partial window is padded with ``PAD_ID`` and its padded targets get weight 0.
"""

from __future__ import annotations

import numpy as np

from sh2_jax import tokenizer


def pack_documents(docs: list[bytes]) -> np.ndarray:
  """Documents -> int32 stream [n] with EOD after each document."""
  if not docs:
    raise ValueError("no documents to pack")
  parts = []
  for d in docs:
    parts.append(tokenizer.encode(d))
    parts.append(np.array([tokenizer.EOD_ID], np.int32))
  return np.concatenate(parts)


class PackedWindows:
  """A Grain random-access source over the windows ``ids`` of a packed stream.

  Item: ``{"inputs": [L] int32, "targets": [L] int32, "weights": [L] float32}``. An id of -1
  is an all-padding window of weight 0 (used to round the eval set up to whole batches).
  """

  def __init__(self, stream: np.ndarray, seq_len: int, ids: np.ndarray):
    self.stream = stream
    self.seq_len = seq_len
    self.ids = np.asarray(ids, np.int64)

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    k, length = int(self.ids[i]), self.seq_len
    window = np.full(length + 1, tokenizer.PAD_ID, np.int32)
    weights = np.zeros(length, np.float32)
    if k >= 0:
      chunk = self.stream[k * length: k * length + length + 1]
      window[:len(chunk)] = chunk
      weights[:len(chunk) - 1] = 1.0
    return {"inputs": window[:-1], "targets": window[1:], "weights": weights}

  def with_ids(self, ids: np.ndarray) -> "PackedWindows":
    """The same stream over other window ids (eval pads with -1 to whole batches)."""
    return PackedWindows(self.stream, self.seq_len, ids)

  def __repr__(self) -> str:  # Grain logs the source
    return f"PackedWindows(windows={len(self)}, seq_len={self.seq_len})"


def num_windows(stream_len: int, seq_len: int) -> int:
  """Windows needed so that every token but the first is a target once."""
  return max(0, -(-(stream_len - 1) // seq_len))


def split_windows(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Window ids -> (train, eval). Every m-th window is held out, m = round(1 / eval_fraction),
  so the held-out set samples the whole corpus (prose and DNA alike); 0 holds out nothing and
  1 holds out everything."""
  if not 0.0 <= eval_fraction <= 1.0:
    raise ValueError(f"data.eval_fraction {eval_fraction!r} is not valid; expected a number in "
                     "[0, 1]")
  ids = np.arange(n)
  if eval_fraction == 0.0:
    return ids, ids[:0]
  held = (ids % max(1, round(1.0 / eval_fraction))) == 0
  return ids[~held], ids[held]
