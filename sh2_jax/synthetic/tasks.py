"""Seeded byte-level generators of synthetic token-manipulation tasks.

Every example is a token sequence ``seq`` of ``seq_len + 1`` byte ids; the model reads
``inputs = seq[:-1]`` and predicts ``targets = seq[1:]``. Only the answer tokens are scored:
``weights[t] = 1`` exactly when ``targets[t]`` is an answer token, and ``query_ids[t]`` numbers
the query that answer token belongs to (-1 elsewhere), for per-query exact match.

Example ``i`` of a task with seed ``s`` is drawn from ``numpy.random.default_rng([s, split, i])``
alone, so any example can be regenerated on its own (random access for Grain, the same data
for every layout of a benchmark) and the train and eval splits never share a stream.

Token alphabet (all ids < 256, so every task is a byte sequence; ids 0/1 = EOD/PAD are never
content):

* ``BLANK`` (2) fills unused positions, ``SEP`` (3) is the copy delimiter, ``END`` (4) ends a
  compressed output;
* content tokens start at ``BASE`` (16): recall tasks draw keys from ``[BASE, BASE + vocab)``
  and values from ``[BASE + vocab, BASE + 2 vocab)`` (disjoint, as in Zoology's MQAR); copy
  tasks draw data from ``[BASE, BASE + vocab)`` and compression noise from the ``noise_vocab``
  ids after it.

Tasks (``TASKS``):

* ``ar`` associative recall: ``k1 v1 ... kN vN BLANK ... kq -> vq`` (one query, at the end);
* ``mqar`` multi-query associative recall (Zoology): the N pairs, ``gap`` BLANKs, then a query
  region where ``n_queries`` distinct keys sit at random positions among BLANKs, each followed
  by its value (teacher forcing: the value is scored at the key's position);
* ``mtr`` multi-token recall: ``mqar`` whose values are ``value_len`` tokens long;
* ``selective_copy`` (Mamba): ``n_tokens`` data tokens at random positions among BLANKs, then
  ``SEP`` and the data tokens in order;
* ``compression``: a random number in ``[ceil(n_tokens / 2), n_tokens]`` of data tokens at
  random positions among random *noise* tokens (a separate alphabet, so the model must know
  which ids to drop, not just skip one blank id), then ``SEP``, the data tokens in order and
  ``END`` (so the output length must be inferred too); PAD after ``END``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from sh2_jax.tokenizer import PAD_ID

BLANK, SEP, END = 2, 3, 4
BASE = 16
MAX_CONTENT = 256 - BASE  # content ids available below 256
SPLITS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class Example:
  """One example: ``seq`` [L+1] int32 and, over the L target positions, ``weights`` [L]
  float32 (1 on answer tokens) and ``query_ids`` [L] int32 (-1 off answers)."""
  seq: np.ndarray
  weights: np.ndarray
  query_ids: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return {"inputs": self.seq[:-1], "targets": self.seq[1:], "weights": self.weights,
            "query_ids": self.query_ids}


def _bad(name: str, value, valid: str):
  raise ValueError(f"{name} {value!r} is not valid; expected {valid}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or \
      value < (0 if allow_zero else 1):
    _bad(name, value, "a non-negative integer" if allow_zero else "a positive integer")


def _finish(seq: list | np.ndarray, answers: list[tuple[int, int]]) -> Example:
  """``answers``: (position in seq, query id) of every answer token -> the Example."""
  seq = np.asarray(seq, np.int32)
  weights = np.zeros(len(seq) - 1, np.float32)
  qids = np.full(len(seq) - 1, -1, np.int32)
  for pos, q in answers:
    weights[pos - 1] = 1.0  # the token at pos is the target of position pos - 1
    qids[pos - 1] = q
  return Example(seq, weights, qids)


def _spread(rng: np.random.Generator, n_items: int, free: int) -> np.ndarray:
  """Random sizes of the ``n_items + 1`` runs of filler around ``n_items`` items (sum ``free``),
  every arrangement equally likely (stars and bars)."""
  cuts = np.sort(rng.choice(free + n_items, n_items, replace=False))
  return np.diff(np.concatenate([[-1], cuts, [free + n_items]])) - 1


def _recall(rng, seq_len: int, n_pairs: int, n_queries: int, vocab: int, value_len: int,
            gap: int, queries_at_end: bool) -> Example:
  keys = rng.choice(vocab, n_pairs, replace=False) + BASE
  values = rng.integers(0, vocab, (n_pairs, value_len)) + BASE + vocab
  seq: list[int] = []
  for k, v in zip(keys, values):
    seq += [int(k), *map(int, v)]
  seq += [BLANK] * gap
  free = seq_len + 1 - len(seq) - n_queries * (1 + value_len)
  order = rng.choice(n_pairs, n_queries, replace=False)
  if queries_at_end:
    runs = np.zeros(n_queries + 1, np.int64)
    runs[0] = free
  else:
    runs = _spread(rng, n_queries, free)
  answers = []
  for q, idx in enumerate(order):
    seq += [BLANK] * int(runs[q]) + [int(keys[idx])]
    answers += [(len(seq) + j, q) for j in range(value_len)]
    seq += list(map(int, values[idx]))
  seq += [BLANK] * int(runs[-1])
  return _finish(seq, answers)


def _check_recall(seq_len, n_pairs, n_queries, vocab, value_len, gap) -> None:
  for name, v in (("seq_len", seq_len), ("n_pairs", n_pairs), ("n_queries", n_queries),
                  ("vocab", vocab), ("value_len", value_len)):
    _positive(name, v)
  _positive("gap", gap, allow_zero=True)
  if 2 * vocab > MAX_CONTENT:
    _bad("vocab", vocab, f"at most {MAX_CONTENT // 2} (keys and values are disjoint byte ids)")
  if n_pairs > vocab:
    _bad("n_pairs", n_pairs, f"at most vocab {vocab} (keys are distinct)")
  if n_queries > n_pairs:
    _bad("n_queries", n_queries, f"at most n_pairs {n_pairs} (queried keys are distinct)")
  need = n_pairs * (1 + value_len) + gap + n_queries * (1 + value_len)
  if need > seq_len + 1:
    _bad("seq_len", seq_len, f"at least {need - 1} for n_pairs {n_pairs}, n_queries "
         f"{n_queries}, value_len {value_len}, gap {gap}")


def associative_recall(rng, seq_len: int, n_pairs: int = 8, vocab: int = 32) -> Example:
  """``n_pairs`` distinct keys with their values, BLANKs, then one key as the last input
  token; its value is the last target."""
  _check_recall(seq_len, n_pairs, 1, vocab, 1, 0)
  return _recall(rng, seq_len, n_pairs, 1, vocab, 1, 0, queries_at_end=True)


def mqar(rng, seq_len: int, n_pairs: int = 8, n_queries: int = 0, vocab: int = 32,
         gap: int = 0) -> Example:
  """Multi-query associative recall; ``n_queries`` 0 means all ``n_pairs`` keys."""
  n_queries = n_queries or n_pairs
  _check_recall(seq_len, n_pairs, n_queries, vocab, 1, gap)
  return _recall(rng, seq_len, n_pairs, n_queries, vocab, 1, gap, queries_at_end=False)


def multi_token_recall(rng, seq_len: int, n_pairs: int = 8, n_queries: int = 0, vocab: int = 32,
                       value_len: int = 3, gap: int = 0) -> Example:
  """MQAR with ``value_len``-token values; a query is right when all its tokens are."""
  n_queries = n_queries or n_pairs
  _check_recall(seq_len, n_pairs, n_queries, vocab, value_len, gap)
  return _recall(rng, seq_len, n_pairs, n_queries, vocab, value_len, gap, queries_at_end=False)


def _check_copy(seq_len, n_tokens, vocab, extra_vocab, tail) -> None:
  for name, v in (("seq_len", seq_len), ("n_tokens", n_tokens), ("vocab", vocab)):
    _positive(name, v)
  if vocab + extra_vocab > MAX_CONTENT:
    _bad("vocab", vocab, f"at most {MAX_CONTENT - extra_vocab} (byte ids {BASE}..255"
         + (f" shared with noise_vocab {extra_vocab})" if extra_vocab else ")"))
  need = 2 * n_tokens + 1 + tail
  if need > seq_len + 1:
    _bad("seq_len", seq_len, f"at least {need - 1} for n_tokens {n_tokens}")


def selective_copy(rng, seq_len: int, n_tokens: int = 8, vocab: int = 16) -> Example:
  """Data tokens among BLANKs, ``SEP``, then the data tokens in order (all scored)."""
  _check_copy(seq_len, n_tokens, vocab, 0, 0)
  region = seq_len - n_tokens  # seq_len + 1 = region + SEP + n_tokens
  data = rng.integers(0, vocab, n_tokens) + BASE
  seq = np.full(region, BLANK, np.int64)
  seq[np.sort(rng.choice(region, n_tokens, replace=False))] = data
  seq = [*seq, SEP, *data]
  return _finish(seq, [(region + 1 + j, 0) for j in range(n_tokens)])


def compression(rng, seq_len: int, n_tokens: int = 8, vocab: int = 16,
                noise_vocab: int = 16) -> Example:
  """Data tokens among noise tokens, ``SEP``, the data tokens in order, ``END`` (all scored),
  PAD up to the fixed length."""
  _positive("noise_vocab", noise_vocab)
  _check_copy(seq_len, n_tokens, vocab, noise_vocab, 1)
  region = seq_len - n_tokens - 1  # seq_len + 1 = region + SEP + n_tokens + END
  n = int(rng.integers((n_tokens + 1) // 2, n_tokens + 1))
  data = rng.integers(0, vocab, n) + BASE
  seq = rng.integers(0, noise_vocab, region) + BASE + vocab
  seq[np.sort(rng.choice(region, n, replace=False))] = data
  seq = [*seq, SEP, *data, END] + [PAD_ID] * (n_tokens - n)
  return _finish(seq, [(region + 1 + j, 0) for j in range(n + 1)])


TASKS: dict[str, Callable[..., Example]] = {
    "ar": associative_recall, "mqar": mqar, "mtr": multi_token_recall,
    "selective_copy": selective_copy, "compression": compression}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task with its parameters (``seq_len`` included) and seed: a pure function of the
  (split, index) pair."""
  task: str
  seq_len: int
  params: tuple[tuple[str, int], ...] = ()
  seed: int = 0

  def __post_init__(self):
    if self.task not in TASKS:
      _bad("task", self.task, "one of " + ", ".join(TASKS))
    import inspect
    sig = inspect.signature(TASKS[self.task])
    valid = [p for p in sig.parameters if p not in ("rng", "seq_len")]
    for name, _ in self.params:
      if name not in valid:
        _bad(f"{self.task} parameter", name, "one of " + ", ".join(valid))
    self.example("train", 0)  # validates the values with the generator's own message

  @classmethod
  def make(cls, task: str, seq_len: int, seed: int = 0, **params) -> "TaskSpec":
    return cls(task, seq_len, tuple(sorted(params.items())), seed)

  def example(self, split: str, index: int) -> Example:
    if split not in SPLITS:
      _bad("split", split, "one of " + ", ".join(SPLITS))
    rng = np.random.default_rng([self.seed, SPLITS[split], int(index)])
    return TASKS[self.task](rng, self.seq_len, **dict(self.params))

  def batch(self, split: str, start: int, size: int) -> dict[str, np.ndarray]:
    """Examples ``start .. start + size - 1`` stacked: inputs/targets/query_ids [B, L] int32,
    weights [B, L] float32."""
    rows = [self.example(split, start + i).as_dict() for i in range(size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
