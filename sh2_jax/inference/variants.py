"""Variant effects, the Evo 2 way: score a window of the reference around each single-base
variant with the reference base and with the alternative; the effect is the change in
log-likelihood, ``delta = score(alt window) - score(ref window)`` (mean per token by default).
Negative: the model finds the variant less likely (Evo 2's loss-of-function signal).

Variants come from a table or a VCF, at 1-based positions on a FASTA reference read by random
access (pyfaidx; its ``.fai`` index is built once beside the FASTA, or in a temporary folder
when that folder is read-only; the FASTA must be uncompressed). Every row is checked before
anything is scored: the chromosome exists, the position is on it, the reference base there is
the row's ``ref``, both alleles are single bases A, C, G, T. Windows are ``width`` bases
centred on the variant (shifted inward at a chromosome's ends), upper-cased; reference windows
shared by several variants are scored once; all windows go through ``sequence_scores`` in
batches.

  table (tab-separated, a header line naming the columns; '#' lines after it are comments):
      chrom  pos  ref  alt  [label]  [any other columns, ignored]
  VCF: CHROM POS ID REF ALT ...; a multi-allelic ALT (A,T) gives one row per allele; a label
      comes from the INFO key of that name (``label=1``) when every row has it.
Labels are 0/1 (or true/false): 1 is the class expected to lower the likelihood, so the AUROC
ranks variants by ``-delta``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import tempfile
from typing import Sequence

import numpy as np

from sh2_jax import tokenizer
from sh2_jax.inference.scoring import reverse_complement, sequence_scores

BASES = "ACGT"
TABLE_COLUMNS = ("chrom", "pos", "ref", "alt")
LABEL_VALUES = {"1": 1, "0": 0, "true": 1, "false": 0}
DEFAULT_WINDOW = 8192  # Evo 2's variant-effect window


@dataclasses.dataclass(frozen=True)
class Variant:
  """One single-base variant; ``where`` names its row (``file line N``) for errors."""
  where: str
  chrom: str
  pos: int  # 1-based
  ref: str
  alt: str
  label: int | None = None

  def __str__(self) -> str:
    return f"{self.chrom}:{self.pos} {self.ref}>{self.alt}"


def mutate(sequence: str | bytes, position: int, alt: str | bytes) -> bytes:
  """``sequence`` with the base at ``position`` (0-based) replaced by ``alt`` (one of A, C, G,
  T in either case)."""
  seq = sequence.encode() if isinstance(sequence, str) else bytes(sequence)
  alt_b = alt.encode() if isinstance(alt, str) else bytes(alt)
  if len(alt_b) != 1 or alt_b.upper() not in b"ACGT":
    raise ValueError(f"alt {alt!r} is not a single DNA base; expected one of A, C, G, T")
  if not 0 <= position < len(seq):
    raise ValueError(f"position {position} is outside the sequence 0..{len(seq) - 1}")
  return seq[:position] + alt_b + seq[position + 1:]


def variant_effect(model, reference: str | bytes, variants: Sequence[tuple[int, str]],
                   reduce: str = "mean", **score_kw) -> np.ndarray:
  """Variant effects inside one in-memory sequence: ``score(mutated) - score(reference)``
  for each (0-based position, alt) pair; ``score_kw`` go to ``sequence_scores``."""
  seqs = [reference] + [mutate(reference, pos, alt) for pos, alt in variants]
  scores = sequence_scores(model, seqs, reduce, **score_kw)
  return scores[1:] - scores[0]


# ------------------------------------------------------------------------- reading variants
def _lines(path: str) -> list[str]:
  opener = gzip.open if path.lower().endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      return f.read().splitlines()
  except UnicodeDecodeError:
    raise ValueError(f"variants file {path!r} is not a text table or VCF") from None
  except (gzip.BadGzipFile, EOFError) as e:
    raise ValueError(f"variants file {path!r} cannot be decompressed: {e}") from None


def _variant(where: str, chrom: str, pos: str, ref: str, alt: str, label) -> Variant:
  try:
    pos_i = int(pos)
  except ValueError:
    raise ValueError(f"{where}: position {pos!r} is not an integer") from None
  if pos_i < 1:
    raise ValueError(f"{where}: position {pos_i} is not valid; positions are 1-based (>= 1)")
  ref_u, alt_u = ref.upper(), alt.upper()
  for name, allele in (("ref", ref_u), ("alt", alt_u)):
    if len(allele) != 1 or allele not in BASES:
      raise ValueError(f"{where}: {name} allele {allele!r} is not a single base; expected one "
                       "of A, C, G, T (only single-base substitutions are scored)")
  if ref_u == alt_u:
    raise ValueError(f"{where}: alt {alt_u!r} equals ref; nothing to score")
  if label is not None:
    if label.strip().lower() not in LABEL_VALUES:
      raise ValueError(f"{where}: label {label!r} is not 0/1 (or true/false); map your classes "
                       "to 1 (expected to lower the likelihood) and 0")
    label = LABEL_VALUES[label.strip().lower()]
  return Variant(where, chrom, pos_i, ref_u, alt_u, label)


def _read_table(path: str, lines: list[str], label_column: str) -> list[Variant]:
  rows = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
  if not rows:
    raise ValueError(f"variants table {path!r} is empty; expected a header line "
                     f"{chr(9).join(TABLE_COLUMNS)} and one row per variant")
  head_n, head = rows[0]
  names = [c.strip().lstrip("#").strip().lower() for c in head.split("\t")]
  missing = [c for c in TABLE_COLUMNS if c not in names]
  if missing:
    raise ValueError(f"{path} line {head_n}: the header {head!r} lacks column(s) {missing}; "
                     f"expected tab-separated columns {', '.join(TABLE_COLUMNS)} "
                     f"[, {label_column}]")
  col = {c: names.index(c) for c in TABLE_COLUMNS}
  label_at = names.index(label_column.lower()) if label_column.lower() in names else None
  out = []
  for n, ln in rows[1:]:
    if ln.startswith("#"):
      continue
    cells = ln.split("\t")
    where = f"{path} line {n}"
    if len(cells) < len(names):
      raise ValueError(f"{where}: {len(cells)} tab-separated fields, the header has "
                       f"{len(names)}")
    label = cells[label_at] if label_at is not None else None
    out.append(_variant(where, *(cells[col[c]].strip() for c in TABLE_COLUMNS), label))
  return out


def _read_vcf(path: str, lines: list[str], label_column: str) -> list[Variant]:
  out, labels = [], []
  for n, ln in enumerate(lines, 1):
    if not ln.strip() or ln.startswith("#"):
      continue
    cells = ln.split("\t")
    where = f"{path} line {n}"
    if len(cells) < 5:
      raise ValueError(f"{where}: {len(cells)} tab-separated fields; a VCF row has at least "
                       "CHROM POS ID REF ALT")
    info = dict(kv.partition("=")[::2] for kv in cells[7].split(";")) if len(cells) > 7 else {}
    label = info.get(label_column)
    for alt in cells[4].split(","):
      out.append((where, cells[0], cells[1], cells[3], alt))
      labels.append(label)
  if not out:
    raise ValueError(f"VCF {path!r} holds no variant rows")
  unlabelled = [row[0] for row, label in zip(out, labels) if label is None]
  if unlabelled and len(unlabelled) < len(out):
    raise ValueError(f"{unlabelled[0]}: no INFO key {label_column!r}, which other rows have; "
                     "label every row or none")
  return [_variant(*row, label) for row, label in zip(out, labels)]


def read_variants(path: str, label_column: str = "label") -> list[Variant]:
  """The variants of a table or a VCF (``.vcf``/``.vcf.gz``, or a ``##fileformat=VCF``
  first line), every allele and label checked; errors name the file and line."""
  if not os.path.isfile(path):
    raise ValueError(f"variants file {path!r} does not exist" if not os.path.exists(path)
                     else f"variants file {path!r} is not a file")
  lines = _lines(path)
  vcf = (path.lower().endswith((".vcf", ".vcf.gz")) or
         bool(lines) and lines[0].startswith("##fileformat=VCF"))
  variants = (_read_vcf if vcf else _read_table)(path, lines, label_column)
  if not variants:
    raise ValueError(f"variants file {path!r} holds no variant rows")
  return variants


# ------------------------------------------------------------------------------ reference
def _index(path: str) -> str:
  """The path of an up-to-date ``.fai`` index of ``path``: ``<path>.fai`` (as samtools faidx
  writes it), built when missing or older than the FASTA -- into a temporary name and renamed,
  so concurrent readers never see half an index -- or, when that folder is read-only, built in
  a temporary folder."""
  import pyfaidx
  fai = path + ".fai"
  if os.path.exists(fai) and os.path.getmtime(fai) >= os.path.getmtime(path):
    return fai
  folder = os.path.dirname(os.path.abspath(path))
  if not os.access(folder, os.W_OK):
    fai = os.path.join(tempfile.mkdtemp(prefix="sh2_fai_"), os.path.basename(fai))
  tmp = f"{fai}.tmp{os.getpid()}"
  try:
    pyfaidx.Faidx(path, indexname=tmp).close()
    os.replace(tmp, fai)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return fai


class Reference:
  """A FASTA reference read by random access through its ``.fai`` index (pyfaidx)."""

  def __init__(self, path: str):
    import pyfaidx
    if not os.path.isfile(path):
      raise ValueError(f"reference {path!r} does not exist" if not os.path.exists(path)
                       else f"reference {path!r} is not a file")
    with open(path, "rb") as f:
      if f.read(2) == b"\x1f\x8b":
        raise ValueError(f"reference {path!r} is gzip-compressed; random access needs a plain "
                         "FASTA file (gunzip it once)")
    try:
      self._fasta = pyfaidx.Fasta(path, indexname=_index(path), as_raw=True,
                                  sequence_always_upper=True, rebuild=False)
    except (OSError, ValueError, ImportError, pyfaidx.FastaIndexingError) as e:
      raise ValueError(f"reference {path!r} cannot be read as an indexed FASTA: {e}") from None
    self.path = path
    self.names = list(self._fasta.keys())

  def length(self, chrom: str) -> int:
    return len(self._fasta[chrom])

  def fetch(self, chrom: str, start: int, end: int) -> str:
    """Bases [start, end) (0-based, half-open) of ``chrom``, upper-cased."""
    return self._fasta[chrom][start:end]


def check_reference(variants: Sequence[Variant], reference: Reference) -> None:
  """Every variant's chromosome exists, its position is on it, and its ref base is there."""
  known = set(reference.names)
  for v in variants:
    if v.chrom not in known:
      shown = ", ".join(reference.names[:10]) + (" ..." if len(known) > 10 else "")
      raise ValueError(f"{v.where} ({v}): chromosome {v.chrom!r} is not in the reference "
                       f"{reference.path!r}; it has {shown}")
    n = reference.length(v.chrom)
    if v.pos > n:
      raise ValueError(f"{v.where} ({v}): position {v.pos} is past the end of {v.chrom} "
                       f"(1..{n})")
    base = reference.fetch(v.chrom, v.pos - 1, v.pos)
    if base != v.ref:
      raise ValueError(f"{v.where} ({v}): the reference has {base!r} at {v.chrom}:{v.pos}, "
                       f"not the row's ref {v.ref!r} (is the reference the assembly the "
                       "variants were called on?)")


def window_bounds(pos0: int, width: int, length: int) -> tuple[int, int]:
  """[start, end) of ``width`` bases centred on 0-based ``pos0`` in a sequence of ``length``,
  shifted inward at either end (the whole sequence when it is shorter)."""
  start = min(max(0, pos0 - width // 2), max(0, length - width))
  return start, min(length, start + width)


def score_variants(model, variants: Sequence[Variant], reference: Reference,
                   width: int | None = None, *, reduce: str = "mean", rc: bool = False,
                   batch_size: int | None = 8, segment_len: int | None = None,
                   chunk_size: int = 4096, progress: bool = False) -> dict[str, np.ndarray]:
  """Scores of the reference and alternative windows and their difference, each [N] float64:
  {'ref': ..., 'alt': ..., 'delta': alt - ref}. ``width`` defaults to 8192 bases (Evo 2's),
  capped at the model's max_seqlen. Everything is checked before anything is scored (the
  reference bases; with ``rc``, that every window is DNA). Variants are taken ``chunk_size``
  at a time (host memory: two windows per variant of a chunk); inside a chunk, variants
  sharing a window share its reference score; ``batch_size`` windows go through each forward.
  """
  from tqdm import tqdm
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce {reduce!r} is not valid for variant effects; expected 'mean' or "
                     "'sum'")
  width = min(DEFAULT_WINDOW, model.cfg.max_seqlen) if width is None else width
  if not isinstance(width, (int, np.integer)) or not 2 <= width <= model.cfg.max_seqlen:
    raise ValueError(f"window {width!r} is not valid; expected 2..{model.cfg.max_seqlen} (the "
                     "model's max_seqlen)")
  check_reference(variants, reference)
  keys = [(v.chrom, *window_bounds(v.pos - 1, width, reference.length(v.chrom)))
          for v in variants]
  if rc:  # a window that is not DNA cannot be reverse-complemented: say whose window it is
    seen = set()
    for v, key in zip(variants, keys):
      if key not in seen:
        seen.add(key)
        reverse_complement(tokenizer.encode(reference.fetch(*key)),
                           f"{v.where} ({v}): the window {key[0]}:{key[1] + 1}-{key[2]}")
  out = {"ref": np.empty(len(variants)), "alt": np.empty(len(variants))}
  with tqdm(total=len(variants), desc="variants", unit="var", disable=not progress) as bar:
    for lo in range(0, len(variants), chunk_size):
      ref_of: dict[tuple[str, int, int], int] = {}
      ref_windows, alt_windows, which_ref = [], [], []
      for v, key in zip(variants[lo:lo + chunk_size], keys[lo:lo + chunk_size]):
        if key not in ref_of:
          ref_of[key] = len(ref_windows)
          ref_windows.append(reference.fetch(*key).encode())
        which_ref.append(ref_of[key])
        alt_windows.append(mutate(ref_windows[ref_of[key]], v.pos - 1 - key[1], v.alt))
      scores = sequence_scores(model, ref_windows + alt_windows, reduce, rc=rc,
                               batch_size=batch_size, segment_len=segment_len)
      hi = lo + len(alt_windows)
      out["ref"][lo:hi] = scores[:len(ref_windows)][np.asarray(which_ref)]
      out["alt"][lo:hi] = scores[len(ref_windows):]
      bar.update(hi - lo)
  return {**out, "delta": out["alt"] - out["ref"]}


def auroc(scores, labels) -> float:
  """Area under the ROC curve of ``scores`` for binary ``labels`` (1 is positive): the chance
  that a random positive scores above a random negative, ties counting half (the
  Mann-Whitney U statistic over P*N, from average ranks)."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two 1-D arrays "
                     "of the same length")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be 0 or 1; got {sorted(set(labels.tolist()) - {0, 1})[:5]}")
  pos = labels == 1
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative")
  order = np.argsort(scores, kind="mergesort")
  s = scores[order]
  edges = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])  # starts of runs of equal scores
  ranks = np.empty(len(s))
  ranks[order] = np.repeat((edges[:-1] + edges[1:] + 1) / 2.0, np.diff(edges))
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def delta_table(variants: Sequence[Variant], result: dict[str, np.ndarray]) -> str:
  """The results as tab-separated text: a header, then one line per variant,
  ``chrom pos ref alt [label] ref_score alt_score delta``."""
  labels = all(v.label is not None for v in variants)
  head = [*TABLE_COLUMNS, *(["label"] if labels else []), "ref_score", "alt_score", "delta"]
  lines = ["\t".join(head)]
  for i, v in enumerate(variants):
    cells = [v.chrom, str(v.pos), v.ref, v.alt] + ([str(v.label)] if labels else [])
    lines.append("\t".join(cells + [f"{result[k][i]:.8g}" for k in ("ref", "alt", "delta")]))
  return "\n".join(lines) + "\n"
