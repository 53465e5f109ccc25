"""Scoring: per-token log-likelihoods, sequence scores, and the variant-effect workflow.

``score(model, tokens)[b, i] = log p(tokens[b, i+1] | tokens[b, :i+1])``: the log-softmax of
the logits at position i gathered at the next token. The first token has no prediction, so
the result has one position fewer than the input ([B, L-1]).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sh2_jax import tokenizer
from sh2_jax.inference.generation import PROMPT_BUCKET, as_token_rows, pad_rows
from sh2_jax.ops.loss import token_loglik


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  return token_loglik(model(tokens)[:, :-1], tokens[:, 1:])


def score(model, tokens):
  """Per-token log-likelihoods (natural log, float32).

  tokens: 1-D ids -> [L-1]; [B, L] -> [B, L-1]; a list of 1-D sequences of different lengths
  -> a list of [L_b - 1] arrays (right-padded into one forward: causal, so padding is inert).
  Every sequence needs at least 2 tokens.
  """
  rows, single = as_token_rows(tokens, model.cfg.vocab_size)
  short = [i for i, r in enumerate(rows) if len(r) < 2]
  if short:
    raise ValueError(f"sequence(s) {short} have fewer than 2 tokens; nothing to score")
  padded, lengths = pad_rows(rows, PROMPT_BUCKET)
  graphdef, state = nnx.split(model)
  ll = np.asarray(_score(graphdef, state, jnp.asarray(padded)))
  if single:
    return ll[0, :lengths[0] - 1]
  if isinstance(tokens, (np.ndarray, jax.Array)):
    return ll[:, :lengths[0] - 1]  # a [B, L] array: every row has length L
  return [ll[i, :n - 1] for i, n in enumerate(lengths)]


def sequence_scores(model, sequences: Sequence[str | bytes], reduce: str = "mean") -> np.ndarray:
  """Text/DNA sequences -> one score each: the mean (or sum) per-token log-likelihood."""
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce {reduce!r} is not one of 'mean', 'sum'")
  lls = score(model, [tokenizer.encode(s) for s in sequences])
  return np.array([getattr(np, reduce)(x) for x in lls], np.float64)


def mutate(sequence: str | bytes, position: int, alt: str | bytes) -> bytes:
  """``sequence`` with the base at ``position`` (0-based) replaced by the single base ``alt``."""
  seq = sequence.encode() if isinstance(sequence, str) else bytes(sequence)
  alt_b = alt.encode() if isinstance(alt, str) else bytes(alt)
  if len(alt_b) != 1:
    raise ValueError(f"alt {alt!r} must be a single base")
  if not 0 <= position < len(seq):
    raise ValueError(f"position {position} is outside the sequence 0..{len(seq) - 1}")
  return seq[:position] + alt_b + seq[position + 1:]


def variant_effect(model, reference: str | bytes, variants: Sequence[tuple[int, str]],
                   reduce: str = "mean") -> np.ndarray:
  """The Evo 2 variant-effect score of single-base variants of ``reference``:
  ``score(mutated) - score(reference)`` (mean log-likelihood by default), one per
  (position, alt) pair. Negative means the model finds the variant less likely."""
  seqs = [reference] + [mutate(reference, pos, alt) for pos, alt in variants]
  scores = sequence_scores(model, seqs, reduce)
  return scores[1:] - scores[0]
