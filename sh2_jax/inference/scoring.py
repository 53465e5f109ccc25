"""Scoring: per-token log-likelihoods and sequence scores, in batches of bounded memory.

``score(model, tokens)[b, i] = log p(tokens[b, i+1] | tokens[b, :i+1])``: the log-softmax of
the logits at position i gathered at the next token. The first token has no prediction, so
a sequence of L tokens has L-1 scores. ``reduce='mean' | 'sum'`` turns them into one number
per sequence; ``rc=True`` averages that number with the reverse complement's (DNA).

Sequences are strings (bytes or str, turned into ids by the byte tokenizer) or token ids.
They are sorted by length, cut into batches of ``batch_size`` and each batch right-padded to a
multiple of 64 tokens: the model is causal, so padding never changes a score, and each row's
result equals that row scored alone. Peak memory is one batch's activations and its
log-likelihoods (the [B, L, vocab] logits stay inside the compiled step); ``segment_len``
further bounds it to one segment of each batch (the segmented forward).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import checks, tokenizer
from sh2_jax.inference.generation import PROMPT_BUCKET, as_token_rows, length_batches
from sh2_jax.ops.loss import token_loglik

REDUCE = ("mean", "sum", "none")
# Reverse complement of DNA bytes: A<->T, C<->G in either case; N (and n) stay.
_DNA = b"ACGTNacgtn"
_COMPLEMENT = np.arange(256, dtype=np.int32)
_COMPLEMENT[np.frombuffer(_DNA, np.uint8)] = np.frombuffer(b"TGCANtgcan", np.uint8)
_IS_DNA = np.zeros(256, bool)
_IS_DNA[np.frombuffer(_DNA, np.uint8)] = True


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  return token_loglik(model(tokens)[:, :-1], tokens[:, 1:])


def reverse_complement(ids: np.ndarray, what: str = "sequence") -> np.ndarray:
  """Byte ids of DNA -> the ids of its reverse complement (case kept, N stays N).

  Anything but A, C, G, T, N (either case) is an error naming ``what`` and the position."""
  ids = np.asarray(ids)
  bad = np.flatnonzero((ids < 0) | (ids > 255) | ~_IS_DNA[np.clip(ids, 0, 255)])
  if bad.size:
    i = int(bad[0])
    shown = repr(chr(ids[i])) if 32 <= ids[i] < 127 else f"token id {int(ids[i])}"
    raise ValueError(f"{what} has {shown} at position {i + 1}; reverse-complement averaging "
                     "needs DNA: A, C, G, T or N (either case)")
  return _COMPLEMENT[ids[::-1]].astype(np.int32)


def _as_rows(model, sequences) -> tuple[list[np.ndarray], str]:
  """Strings and/or token ids -> (id rows, the input's form: 'single' | 'array' | 'list')."""
  if isinstance(sequences, (str, bytes, bytearray)):
    sequences = tokenizer.encode(sequences)
  elif isinstance(sequences, (list, tuple)):
    sequences = [tokenizer.encode(s) if isinstance(s, (str, bytes, bytearray)) else s
                 for s in sequences]
  rows, single = as_token_rows(sequences, model.cfg.vocab_size, "sequence")
  form = ("single" if single else
          "array" if isinstance(sequences, (np.ndarray, jax.Array)) else "list")
  short = [i for i, r in enumerate(rows) if len(r) < 2]
  if short:
    raise ValueError(f"sequence(s) {short} have fewer than 2 tokens; nothing to score")
  for i, r in enumerate(rows):
    checks.length(f"sequence {i} of {len(r)} tokens", len(r), model.cfg.max_seqlen)
  return rows, form


def _loglik_rows(model, rows: list[np.ndarray], batch_size, segment_len, progress) -> list:
  """Per-token log-likelihoods [L_i - 1] (float32) of every row, batched by length."""
  from tqdm import tqdm
  if segment_len is not None and (not isinstance(segment_len, (int, np.integer))
                                  or segment_len < 1):
    raise ValueError(f"segment_len {segment_len!r} must be None or a positive integer")
  graphdef, state = nnx.split(model)
  out: list = [None] * len(rows)
  with tqdm(total=len(rows), desc="score", unit="seq", disable=not progress) as bar:
    for idx, tokens, lengths in length_batches(rows, batch_size, PROMPT_BUCKET):
      if segment_len is None:
        ll = np.asarray(_score(graphdef, state, jnp.asarray(tokens)))
      else:
        from sh2_jax.inference.segmented import segmented_score
        ll = segmented_score(model, tokens, int(segment_len))
      for j, i in enumerate(idx):
        out[i] = ll[j, :lengths[j] - 1]
      bar.update(len(idx))
  return out


def score(model, sequences, *, reduce: str = "none", rc: bool = False,
          batch_size: int | None = None, segment_len: int | None = None,
          progress: bool = False):
  """Log-likelihoods (natural log) of token ids or strings.

  sequences: a string/bytes or 1-D ids (one sequence); [B, L] ids; or a list of strings and/or
  1-D id sequences of any lengths. Every sequence needs 2..max_seqlen tokens.
  reduce: 'none' -> per-token float32 scores ([L-1] for one sequence, [B, L-1] for an array,
  a list of [L_b - 1] arrays for a list); 'mean' | 'sum' -> one float64 per sequence (a float
  for one sequence, else [N]).
  rc: average each sequence's mean/sum with its reverse complement's (DNA only: A, C, G, T, N
  in either case; anything else is an error); needs reduce 'mean' or 'sum'.
  batch_size: sequences per forward (None: all at once); results do not depend on it.
  segment_len: run each batch through the segmented forward in segments of this many tokens.
  progress: a tqdm progress bar on stderr.
  """
  if reduce not in REDUCE:
    raise ValueError(f"reduce {reduce!r} is not one of {', '.join(map(repr, REDUCE))}")
  if rc and reduce == "none":
    raise ValueError("rc=True averages whole-sequence scores with the reverse complement's; "
                     "use reduce='mean' or 'sum' (per-token scores of the two strands do not "
                     "line up)")
  rows, form = _as_rows(model, sequences)
  todo = rows + ([reverse_complement(r, f"sequence {i}") for i, r in enumerate(rows)]
                 if rc else [])
  lls = _loglik_rows(model, todo, batch_size, segment_len, progress)
  if reduce == "none":
    if form == "single":
      return lls[0]
    return np.stack(lls) if form == "array" else lls
  red = np.array([getattr(np, reduce)(x.astype(np.float64)) for x in lls])
  if rc:
    red = (red[:len(rows)] + red[len(rows):]) / 2
  return float(red[0]) if form == "single" else red


def sequence_scores(model, sequences: Sequence, reduce: str = "mean", *, rc: bool = False,
                    batch_size: int | None = None, segment_len: int | None = None,
                    progress: bool = False):
  """One score per sequence of a list (strings and/or ids): ``score`` with ``reduce`` 'mean'
  by default and always one result per sequence ([N] float64, or a list for 'none')."""
  if isinstance(sequences, (str, bytes, bytearray)):
    raise TypeError("sequence_scores takes a list of sequences; for one, use score()")
  return score(model, list(sequences), reduce=reduce, rc=rc, batch_size=batch_size,
               segment_len=segment_len, progress=progress)
