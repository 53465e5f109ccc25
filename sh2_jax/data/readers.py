"""Read documents as raw bytes: text, FASTA and JSON Lines files (each optionally gzipped), and
directories of them.

Everything is bytes (no decoding), so non-UTF-8 input is kept as it is: a token is a byte.
A text file is one document. A FASTA record is one document: header lines (``>``) and comment
lines (``;``) are dropped, the sequence lines of a record are joined without newlines. A JSON
Lines file (how OpenGenome2 ships) holds one ``{"text": ...}`` object per line, each a document.
The format comes from the file's extension (``data.format=auto``) or from ``data.format``; an
unknown extension is an error, never silently read as text.

``fasta_records`` is the one FASTA parser: training reads its documents through it, and the
commands read prompts and sequences with their names through ``read_fasta``.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

from absl import logging

TEXT_SUFFIXES = (".txt", ".text")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".faa", ".frn", ".fas")
JSONL_SUFFIXES = (".jsonl",)
SUFFIXES = {"text": TEXT_SUFFIXES, "fasta": FASTA_SUFFIXES, "jsonl": JSONL_SUFFIXES}
FORMATS = ("auto", *SUFFIXES)
N_HANDLING = ("keep", "drop")


def default_corpus_path() -> str:
  """The small corpus shipped inside the package (English prose + a synthetic genome), so it
  resolves from a checkout and after ``pip install`` alike."""
  return str(Path(__file__).resolve().parent / "corpus")


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f"data file {path!r} looks gzipped but cannot be decompressed: {e}") from e
  return raw


def file_format(path: str, fmt: str = "auto") -> str:
  """``text``, ``fasta`` or ``jsonl``: ``fmt`` itself, or (``auto``) from the extension of
  ``path`` (a trailing ``.gz`` ignored); an unknown extension is an error."""
  if fmt != "auto":
    return fmt
  name = path.lower()
  if name.endswith(".gz"):
    name = name[:-3]
  for kind, suffixes in SUFFIXES.items():
    if name.endswith(suffixes):
      return kind
  valid = ", ".join(s for suffixes in SUFFIXES.values() for s in suffixes)
  raise ValueError(f"data file {path!r} has an unknown extension; expected one of {valid} "
                   f"(each optionally .gz), or set data.format to one of "
                   f"{', '.join(SUFFIXES)} to read every file that way")


def fasta_records(raw: bytes) -> list[tuple[bytes | None, bytes]]:
  """FASTA bytes -> ``(header, sequence)`` per record, in file order.

  ``header`` is the ``>`` line without the ``>`` (stripped); text before the first header is a
  record with header ``None``. Comment lines (``;``) and blank lines are dropped; the sequence
  lines of a record are joined without newlines (a record's sequence may be empty).
  """
  records: list[tuple[bytes | None, list[bytes]]] = [(None, [])]
  for line in raw.splitlines():
    line = line.strip()
    if line.startswith(b">"):
      records.append((line[1:].strip(), []))
    elif line and not line.startswith(b";"):
      records[-1][1].append(line)
  if not records[0][1]:
    records.pop(0)
  return [(header, b"".join(seq)) for header, seq in records]


def parse_fasta(raw: bytes, upper: bool = False, n_handling: str = "keep") -> list[bytes]:
  """FASTA bytes -> one bytes object per record with a non-empty sequence (the training
  documents). Text before the first header counts as a record without a header."""
  out = []
  for _, seq in fasta_records(raw):
    if upper:
      seq = seq.upper()
    if n_handling == "drop":
      seq = seq.replace(b"N", b"").replace(b"n", b"")
    if seq:
      out.append(seq)
  return out


def read_fasta(path: str) -> list[tuple[str, bytes]]:
  """The ``(name, sequence)`` records of a FASTA file of prompts or sequences (optionally
  gzipped); the name is the whole header line after ``>``. A file that is not text, has no
  records, has a sequence before the first header or a record without a sequence is an error."""
  raw = _read_bytes(path)
  try:
    if b"\x00" in raw:
      raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), len(raw), "NUL byte")
    raw.decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{path!r} is not a text FASTA file") from None
  records = fasta_records(raw)
  if not records:
    raise ValueError(f"{path!r} holds no FASTA records")
  if records[0][0] is None:
    raise ValueError(f"{path!r}: sequence before the first '>' header")
  empty = [name.decode() for name, seq in records if not seq]
  if empty:
    raise ValueError(f"{path!r}: record(s) {empty} have no sequence")
  return [(name.decode(), seq) for name, seq in records]


def parse_jsonl(raw: bytes, path: str) -> list[bytes]:
  """JSON Lines bytes -> the UTF-8 bytes of each line's ``text`` string (blank lines and empty
  texts skipped). A line that is not a JSON object with a string ``text`` is an error naming
  the line."""
  docs = []
  for line_no, line in enumerate(raw.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"data file {path!r} line {line_no} is not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
      got = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
      raise ValueError(f"data file {path!r} line {line_no}: expected an object with a string "
                       f"'text' field; got {got}")
    if obj["text"]:
      docs.append(obj["text"].encode("utf-8"))
  return docs


def _read_file(path: str, fmt: str, upper: bool, n_handling: str) -> list[bytes]:
  kind = file_format(path, fmt)
  raw = _read_bytes(path)
  if not raw:
    raise ValueError(f"data file {path!r} is empty")
  if kind == "fasta":
    docs = parse_fasta(raw, upper, n_handling)
    if not docs:
      raise ValueError(f"FASTA file {path!r} has no sequences (only headers, comments or "
                       "blank lines)")
    return docs
  if kind == "jsonl":
    docs = parse_jsonl(raw, path)
    if not docs:
      raise ValueError(f"JSON Lines file {path!r} has no non-empty 'text'")
    return [d.upper() for d in docs] if upper else docs
  return [raw.upper() if upper else raw]


def read_documents(path: str, fmt: str = "auto", upper: bool = False,
                   n_handling: str = "keep") -> list[bytes]:
  """All documents under ``path`` (a file or a directory, read recursively in sorted order,
  hidden files skipped). Empty files inside a directory are skipped with a warning; an empty
  file named directly, or a directory with no data, is an error; so is a file whose format is
  unknown (checked for every file before any is read)."""
  if fmt not in FORMATS:
    raise ValueError(f"data.format {fmt!r} is not valid; expected one of {', '.join(FORMATS)}")
  if n_handling not in N_HANDLING:
    raise ValueError(f"data.n_handling {n_handling!r} is not valid; expected one of "
                     f"{', '.join(N_HANDLING)}")
  if not path:
    raise ValueError("data.path is empty; give a text, FASTA or JSON Lines file or a directory")
  if not os.path.exists(path):
    raise ValueError(f"data path {path!r} does not exist")
  if os.path.isfile(path):
    return _read_file(path, fmt, upper, n_handling)
  files = []
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
  for f in files:
    file_format(f, fmt)
  docs: list[bytes] = []
  for f in files:
    if os.path.getsize(f) == 0:
      logging.warning("skipping empty data file %s", f)
      continue
    docs += _read_file(f, fmt, upper, n_handling)
  if not docs:
    raise ValueError(f"data directory {path!r} holds no non-empty files")
  return docs
