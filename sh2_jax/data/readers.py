"""Read documents as raw bytes: text files, directories of them, FASTA (optionally gzipped).

Everything is bytes (no decoding), so non-UTF-8 input is kept as it is: a token is a byte.
A text file is one document. A FASTA record is one document: header lines (``>``) and comment
lines (``;``) are dropped, the sequence lines of a record are joined without newlines.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from absl import logging

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".faa", ".frn", ".fas")
FORMATS = ("auto", "text", "fasta")
N_HANDLING = ("keep", "drop")


def default_corpus_path() -> str:
  """The small corpus shipped with the project (English prose + a synthetic genome)."""
  return str(Path(__file__).resolve().parents[2] / "data" / "corpus")


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f"data file {path!r} looks gzipped but cannot be decompressed: {e}") from e
  return raw


def _is_fasta(path: str, fmt: str) -> bool:
  if fmt != "auto":
    return fmt == "fasta"
  name = path.lower()
  if name.endswith(".gz"):
    name = name[:-3]
  return name.endswith(FASTA_SUFFIXES)


def parse_fasta_records(raw: bytes, upper: bool = False,
                        n_handling: str = "keep") -> list[tuple[str, bytes]]:
  """FASTA bytes -> (name, sequence) per record with a non-empty sequence. The name is the
  header's first word (as samtools and pyfaidx name records; '' for text before the first
  header, which counts as a record)."""
  records: list[tuple[bytes, list[bytes]]] = [(b"", [])]
  for line in raw.splitlines():
    line = line.strip()
    if line.startswith(b">"):
      records.append((line[1:], []))
    elif line and not line.startswith(b";"):
      records[-1][1].append(line)
  out = []
  for header, lines in records:
    seq = b"".join(lines)
    if upper:
      seq = seq.upper()
    if n_handling == "drop":
      seq = seq.replace(b"N", b"").replace(b"n", b"")
    if seq:
      words = header.split()
      out.append((words[0].decode("utf-8", errors="replace") if words else "", seq))
  return out


def parse_fasta(raw: bytes, upper: bool = False, n_handling: str = "keep") -> list[bytes]:
  """FASTA bytes -> one bytes object per record with a non-empty sequence.

  Text before the first header counts as a record without a header.
  """
  return [seq for _, seq in parse_fasta_records(raw, upper, n_handling)]


def read_fasta_records(path: str) -> list[tuple[str, bytes]]:
  """(name, sequence) of every record of a FASTA file (optionally gzipped); a file with no
  sequence is an error."""
  if not os.path.isfile(path):
    raise ValueError(f"FASTA file {path!r} does not exist" if not os.path.exists(path)
                     else f"FASTA file {path!r} is not a file")
  records = parse_fasta_records(_read_bytes(path))
  if not records:
    raise ValueError(f"FASTA file {path!r} has no sequences (only headers, comments or "
                     "blank lines)")
  return records


def _read_file(path: str, fmt: str, upper: bool, n_handling: str) -> list[bytes]:
  raw = _read_bytes(path)
  if not raw:
    raise ValueError(f"data file {path!r} is empty")
  if _is_fasta(path, fmt):
    docs = parse_fasta(raw, upper, n_handling)
    if not docs:
      raise ValueError(f"FASTA file {path!r} has no sequences (only headers, comments or "
                       "blank lines)")
    return docs
  return [raw.upper() if upper else raw]


def read_documents(path: str, fmt: str = "auto", upper: bool = False,
                   n_handling: str = "keep") -> list[bytes]:
  """All documents under ``path`` (a file or a directory, read recursively in sorted order,
  hidden files skipped). Empty files inside a directory are skipped with a warning; an empty
  file named directly, or a directory with no data, is an error."""
  if fmt not in FORMATS:
    raise ValueError(f"data.format {fmt!r} is not valid; expected one of {', '.join(FORMATS)}")
  if n_handling not in N_HANDLING:
    raise ValueError(f"data.n_handling {n_handling!r} is not valid; expected one of "
                     f"{', '.join(N_HANDLING)}")
  if not path:
    raise ValueError("data.path is empty; give a text/FASTA file or a directory")
  if not os.path.exists(path):
    raise ValueError(f"data path {path!r} does not exist")
  if os.path.isfile(path):
    return _read_file(path, fmt, upper, n_handling)
  files = []
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
  docs: list[bytes] = []
  for f in files:
    if os.path.getsize(f) == 0:
      logging.warning("skipping empty data file %s", f)
      continue
    docs += _read_file(f, fmt, upper, n_handling)
  if not docs:
    raise ValueError(f"data directory {path!r} holds no non-empty files")
  return docs
