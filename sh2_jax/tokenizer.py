"""Byte-level tokens: a token is a byte value 0..255; the vocabulary is padded to 512.

Special ids follow the Evo 2 character tokenizer: ``EOD_ID = 0`` (end of document) and
``PAD_ID = 1`` — both are control bytes that do not occur in text or FASTA. DNA is plain ASCII.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

VOCAB_SIZE = 512
EOD_ID = 0
PAD_ID = 1


def encode(text: str | bytes) -> np.ndarray:
  """str (UTF-8) or bytes -> int32 ids [n]."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  if not isinstance(text, (bytes, bytearray, memoryview)):
    raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")
  return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)


def decode(ids: Iterable[int], skip_special: bool = True) -> bytes:
  """ids -> bytes. Ids >= 256 (free special ids) and, with skip_special, EOD/PAD are dropped;
  negative ids are an error."""
  arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).astype(np.int64)
  if arr.ndim != 1:
    raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
  if np.any(arr < 0) or np.any(arr >= VOCAB_SIZE):
    bad = arr[(arr < 0) | (arr >= VOCAB_SIZE)][0]
    raise ValueError(f"token id {bad} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
  keep = arr < 256
  if skip_special:
    keep &= (arr != EOD_ID) & (arr != PAD_ID)
  return arr[keep].astype(np.uint8).tobytes()


def decode_str(ids: Iterable[int]) -> str:
  return decode(ids).decode("utf-8", errors="replace")


def pad_batch(seqs: Sequence[str | bytes | np.ndarray], length: int | None = None,
              pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad sequences into ``tokens [B, L]`` int32 and ``lengths [B]``; ``length`` defaults
  to the longest; a longer sequence is an error, not a silent truncation."""
  ids = [s if isinstance(s, np.ndarray) else encode(s) for s in seqs]
  if not ids:
    raise ValueError("pad_batch needs at least one sequence")
  lengths = np.array([len(x) for x in ids], np.int32)
  length = int(lengths.max()) if length is None else length
  if lengths.max() > length:
    raise ValueError(f"sequence of length {int(lengths.max())} does not fit length {length}")
  out = np.full((len(ids), length), pad_id, np.int32)
  for i, x in enumerate(ids):
    out[i, :len(x)] = x
  return out, lengths
