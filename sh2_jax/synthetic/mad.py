"""The MAD token-manipulation suite (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"): its six instance generators, its baseline settings and difficulty changes,
written from the protocol of the public MAD code (``mad/data/instances.py``,
``configs/tasks/*.yml``, ``mad/configs.py``), not copied from it.

Every generator takes a ``numpy.random.Generator`` and MAD's keyword arguments and returns
``(inputs, targets)``, int arrays of one length, with ``IGNORE`` (-100, MAD's
``target_ignore_idx``) at the target positions that count for neither loss nor accuracy. The
vocabulary is MAD's: token ids ``0 .. vocab_size - 1`` with the special tokens at the top.

Vocabulary splits (``V = vocab_size``, ``N = noise_vocab_size``):

* in-context recall / noisy recall (multi-query): keys ``[0, (V-N)//2)``, values
  ``[(V-N)//2, V-N)``, noise ``[V-N, V)``; single-query (``multi_query=False``) gives up the top
  id ``V-1`` for a copy prefix before the final probe.
* fuzzy recall: keys ``[0, S//2)``, values ``[S//2, S)`` with ``S = V-1-N`` (multi-query; one
  id fewer single-query), pad ``V-1`` (multi-query; ``V-2`` and copy prefix ``V-1`` otherwise);
  keys and values are runs of 1..``k_motif_size`` / 1..``v_motif_size`` distinct tokens.
* selective copying: content ``[0, V-2)``, blank ``V-2``, copy token ``V-1``.
* compression: content ``[0, V-1-N)``, noise ``[V-1-N, V-1)``, compression token ``V-1``.
* memorization: keys ``[0, S//2)``, values ``[S//2, S)`` with ``S = V-1-N`` (a fixed map, the
  same for every example), insert token ``V-1``.

Targets and the loss mask (which positions MAD scores):

* recall tasks: the training split is next-token prediction over every position
  (``targets = inputs`` shifted by one, no IGNORE); the test split scores only values: every
  value token of a key seen earlier in the sequence (multi-query) and the final probe's value.
* selective copying: the last ``num_tokens_to_copy`` positions (after the copy token), in both
  splits.
* compression: every position, both splits (MAD computes a noise-masked target and then returns
  the inputs as targets; we do the same, so noise tokens are reconstructed too). The model is
  MAD's auto-encoder (encode, pool the last position, decode every position).
* memorization: the insert-token positions (target = the key's value), both splits.

Deviations from MAD (each keeps the instance distribution):

* Randomness: MAD draws train and test from one generator seeded 12345 (train first), and
  selective copying's blank positions from NumPy's global generator. Here each split has its own
  stream, ``default_rng([seed, split])``, and everything comes from it: datasets are
  reproducible per split. MAD checks train/test overlap only with a warning; so does
  ``overlap``.
* Motifs: MAD enumerates every ordered tuple of distinct tokens (``itertools.permutations``),
  shuffles the list and picks one, per instance (millions of tuples at vocabulary 128); we draw
  the tuple directly (``rng.choice(vocab, size, replace=False)``): the same uniform law.
* Memorization's map: MAD zips shuffled key and value permutations; we zip one shuffled key
  order with one shuffled value order (the same uniform random injection).
* In-context recall: MAD's guaranteed key-value pair index can fall on the final probe (then,
  with noise, a sequence can have no pair and MAD fails); we draw it among the pairs before the
  probe.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

IGNORE = -100
SPLITS = {"train": 0, "test": 1}
NUM_TEST_EXAMPLES = 1280  # MADConfig.num_test_examples
MEMORIZATION_MAP_SEED = 12345  # MADConfig.seed: the map is fixed for every example


def _check(cond: bool, name: str, value, valid: str) -> None:
  if not cond:
    raise ValueError(f"{name} {value!r} is not valid; expected {valid}")


def _check_noise(frac_noise: float, noise_vocab_size: int) -> None:
  _check(0 <= frac_noise < 1, "frac_noise", frac_noise, "0 <= frac_noise < 1")
  _check(frac_noise == 0 or noise_vocab_size > 0, "noise_vocab_size", noise_vocab_size,
         "> 0 when frac_noise > 0")


def _shifted(seq: np.ndarray, scored: np.ndarray, is_training: bool):
  """A sequence of ``seq_len + 1`` tokens -> (inputs, targets) of ``seq_len``: training
  targets are every next token; test targets keep only the ``scored`` tokens."""
  seq = np.asarray(seq, np.int32)
  targets = seq if is_training else np.where(scored, seq, IGNORE).astype(np.int32)
  return seq[:-1], targets[1:]


def in_context_recall(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                      is_training: bool = True, multi_query: bool = True,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0):
  """``seq_len / 2`` key-value pairs (the last one a probe of a key seen before), keys drawn
  uniformly with replacement, each key bound to one random value per sequence; each pair is
  instead a pair of noise tokens with probability ``frac_noise``. Returns length
  ``seq_len - 1``."""
  _check(seq_len >= 4 and seq_len % 2 == 0, "seq_len", seq_len, "an even number >= 4")
  _check_noise(frac_noise, noise_vocab_size)
  content = vocab_size - (0 if multi_query else 1) - noise_vocab_size
  _check(content >= 2, "vocab_size", vocab_size,
         f"at least {2 + noise_vocab_size + (0 if multi_query else 1)} for noise_vocab_size "
         f"{noise_vocab_size}")
  n_keys, n_values = content // 2, content - content // 2
  n_pairs = seq_len // 2 - 1  # then the final probe
  keep = rng.integers(n_pairs)  # at least one real pair
  noise = rng.random(n_pairs) < frac_noise if frac_noise > 0 else np.zeros(n_pairs, bool)
  noise[keep] = False
  keys = rng.integers(0, n_keys, n_pairs)
  table = rng.integers(0, n_values, n_keys) + n_keys  # the value of every key, this sequence
  values = table[keys]
  pairs = np.stack([keys, values], 1)
  if noise.any():
    pairs[noise] = rng.integers(0, noise_vocab_size, (int(noise.sum()), 2)) + content
  seen = np.zeros(n_pairs, bool)  # the key of pair i appeared (as a real pair) before i
  first = {}
  for i in np.flatnonzero(~noise):
    seen[i] = keys[i] in first
    first.setdefault(keys[i], i)
  probe = rng.choice(np.unique(keys[~noise]))
  scored = np.zeros((n_pairs, 2), bool)
  scored[:, 1] = seen & ~noise & multi_query
  tail = [probe, table[probe]]
  seq = np.concatenate([pairs.reshape(-1), ([] if multi_query else [vocab_size - 1]) + tail])
  mask = np.concatenate([scored.reshape(-1), [False] * (len(tail) - 1 + (not multi_query)),
                         [True]])
  return _shifted(seq, mask, is_training)


def noisy_in_context_recall(rng: np.random.Generator, vocab_size: int = 32, seq_len: int = 128,
                            is_training: bool = True, multi_query: bool = True,
                            noise_vocab_size: int = 16, frac_noise: float = 0.2):
  """In-context recall with noise pairs (MAD's defaults: 16 noise tokens, 20% of the pairs)."""
  return in_context_recall(rng, vocab_size, seq_len, is_training, multi_query,
                           noise_vocab_size, frac_noise)


def _motif(rng, vocab: np.ndarray, size: int) -> tuple[int, ...]:
  return tuple(int(t) for t in rng.choice(vocab, size, replace=False))


def fuzzy_in_context_recall(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                            k_motif_size: int = 3, v_motif_size: int = 3,
                            is_training: bool = True, multi_query: bool = True,
                            noise_vocab_size: int = 0, frac_noise: float = 0.0):
  """Recall of keys and values that are runs of distinct tokens: key sizes 1..k_motif_size in
  training (always k_motif_size in the test split), value sizes 1..v_motif_size. A probe pair
  is placed at a random point of the fill (when the fill reaches it) and repeated at the end;
  the front is padded to ``seq_len``. As in MAD, the fill can end before the probe's random
  point (about 3% of baseline test sequences): its final value is then not in the context."""
  _check(k_motif_size >= 1, "k_motif_size", k_motif_size, "a positive integer")
  _check(v_motif_size >= 1, "v_motif_size", v_motif_size, "a positive integer")
  _check_noise(frac_noise, noise_vocab_size)
  content = vocab_size - (1 if multi_query else 2) - noise_vocab_size
  _check(content // 2 >= k_motif_size and content - content // 2 >= v_motif_size, "vocab_size",
         vocab_size, f"large enough for {k_motif_size}-token keys and {v_motif_size}-token "
         f"values of distinct tokens")
  _check(seq_len > 2 * (k_motif_size + v_motif_size), "seq_len", seq_len,
         f"> {2 * (k_motif_size + v_motif_size)} for these motif sizes")
  pad = vocab_size - 1 if multi_query else vocab_size - 2
  key_vocab, value_vocab = np.arange(content // 2), np.arange(content // 2, content)
  noise_vocab = np.arange(content, content + noise_vocab_size)
  key_sizes = list(range(1, k_motif_size + 1)) if is_training else [k_motif_size]
  value_sizes = list(range(1, v_motif_size + 1))
  k_probe = _motif(rng, key_vocab, int(rng.choice(key_sizes)))
  v_probe = _motif(rng, value_vocab, int(rng.choice(value_sizes)))
  probe_len = len(k_probe) + len(v_probe)
  probe_at = rng.integers(seq_len - 2 * probe_len)
  probe_added = False
  table: dict[tuple, tuple] = {}
  seq: list[int] = []
  scored: list[bool] = []
  while len(seq) < seq_len - probe_len - (k_motif_size + v_motif_size):
    k_size, v_size = int(rng.choice(key_sizes)), int(rng.choice(value_sizes))
    if len(seq) >= probe_at and not probe_added:
      seq += [*k_probe, *v_probe]
      scored += [False] * probe_len
      table[k_probe] = v_probe
      probe_added = True
      continue
    if frac_noise > 0 and rng.random() < frac_noise:
      seq += [int(t) for t in rng.choice(noise_vocab, k_size + v_size)]
      scored += [False] * (k_size + v_size)
      continue
    k = _motif(rng, key_vocab, k_size)
    if k == k_probe:
      v, probe_added = v_probe, True
    else:
      v = table.get(k) or _motif(rng, value_vocab, v_size)
    seq += [*k, *v]
    scored += [False] * len(k) + [multi_query and k in table] * len(v)
    table[k] = v
  tail = ([] if multi_query else [vocab_size - 1]) + [*k_probe, *v_probe]
  seq += tail
  scored += [False] * (len(tail) - len(v_probe)) + [True] * len(v_probe)
  n_pad = seq_len + 1 - len(seq)
  seq = [pad] * n_pad + seq
  scored = [False] * n_pad + scored
  return _shifted(np.asarray(seq), np.asarray(scored), is_training)


def selective_copying(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 256,
                      num_tokens_to_copy: int = 16, is_training: bool = True):
  """``num_tokens_to_copy`` content tokens with blanks inserted before random ones of them
  (never after the last), the copy token, then blanks; the targets of those final positions are
  the content tokens in order."""
  n = num_tokens_to_copy
  _check(n >= 1, "num_tokens_to_copy", n, "a positive integer")
  _check(seq_len > 2 * n + 1, "seq_len", seq_len, f"> {2 * n + 1} for num_tokens_to_copy {n}")
  _check(vocab_size >= 3, "vocab_size", vocab_size, "at least 3 (content, blank, copy)")
  blank, copy = vocab_size - 2, vocab_size - 1
  data = rng.integers(0, vocab_size - 2, n)
  n_blank = seq_len - 2 * n - 1
  before = np.bincount(rng.integers(0, n, n_blank), minlength=n)  # blanks before data[j]
  head = np.concatenate([np.r_[np.full(b, blank), d] for b, d in zip(before, data)])
  inputs = np.concatenate([head, [copy], np.full(n, blank)]).astype(np.int32)
  targets = np.concatenate([np.full(seq_len - n, IGNORE), data]).astype(np.int32)
  return inputs, targets


def compression(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 32,
                noise_vocab_size: int = 0, frac_noise: float = 0.0, is_training: bool = True):
  """``seq_len - 1`` random content tokens (each replaced by a noise token with probability
  ``frac_noise``) and the compression token; the target is the whole input."""
  _check_noise(frac_noise, noise_vocab_size)
  content = vocab_size - 1 - noise_vocab_size
  _check(content >= 1, "vocab_size", vocab_size, f"> {1 + noise_vocab_size}")
  _check(seq_len >= 2, "seq_len", seq_len, "at least 2")
  inputs = rng.integers(0, content, seq_len - 1)
  if frac_noise > 0:
    for i in range(seq_len - 1):  # per position, as MAD (one draw each, in order)
      if rng.random() < frac_noise:
        inputs[i] = content + rng.integers(noise_vocab_size)
  inputs = np.concatenate([inputs, [vocab_size - 1]]).astype(np.int32)
  return inputs, inputs.copy()


def memorization_map(vocab_size: int, noise_vocab_size: int = 0,
                     seed: int = MEMORIZATION_MAP_SEED) -> np.ndarray:
  """The fixed key -> value map: [n_keys] value ids (``S = vocab_size - 1 - noise``; keys
  ``0 .. S//2 - 1``, values a random injection into ``[S//2, S)``)."""
  content = vocab_size - 1 - noise_vocab_size
  _check(content >= 2, "vocab_size", vocab_size, f"> {2 + noise_vocab_size}")
  map_rng = np.random.default_rng(seed)
  n_keys = content // 2
  order = map_rng.permutation(n_keys)
  values = map_rng.permutation(np.arange(n_keys, content))[:n_keys]
  out = np.empty(n_keys, np.int64)
  out[order] = values
  return out


def memorization(rng: np.random.Generator, vocab_size: int = 256, seq_len: int = 32,
                 noise_vocab_size: int = 0, frac_noise: float = 0.0, is_training: bool = True,
                 kv_map: np.ndarray | None = None):
  """``seq_len / 2`` (key, insert) pairs with keys drawn uniformly; the target at each insert
  token is the key's value under the fixed ``memorization_map`` (noise pairs, probability
  ``frac_noise``, are not scored)."""
  _check(seq_len >= 2 and seq_len % 2 == 0, "seq_len", seq_len, "an even number >= 2")
  _check_noise(frac_noise, noise_vocab_size)
  table = memorization_map(vocab_size, noise_vocab_size) if kv_map is None else kv_map
  content = vocab_size - 1 - noise_vocab_size
  n_pairs = seq_len // 2
  keep = rng.integers(n_pairs)
  noise = rng.random(n_pairs) < frac_noise if frac_noise > 0 else np.zeros(n_pairs, bool)
  noise[keep] = False
  keys = rng.integers(0, len(table), n_pairs)
  inputs = np.stack([keys, np.full(n_pairs, vocab_size - 1)], 1)
  targets = np.stack([np.full(n_pairs, IGNORE), table[keys]], 1)
  if noise.any():
    inputs[noise] = rng.integers(0, noise_vocab_size, (int(noise.sum()), 2)) + content
    targets[noise] = IGNORE
  return inputs.reshape(-1).astype(np.int32), targets.reshape(-1).astype(np.int32)


TASKS: dict[str, Callable] = {
    "in_context_recall": in_context_recall,
    "fuzzy_in_context_recall": fuzzy_in_context_recall,
    "noisy_in_context_recall": noisy_in_context_recall,
    "selective_copying": selective_copying,
    "compression": compression,
    "memorization": memorization,
}

# configs/tasks/*.yml: the baseline of each task (generator kwargs + num_train_examples) and the
# changes, each applied alone to the baseline (mad/configs.py make_benchmark_mad_configs). Keys
# MAD leaves at MADConfig's defaults (noise 0, motif 1) are the generators' defaults here.
BASELINES: dict[str, dict] = {
    "in_context_recall": dict(vocab_size=16, seq_len=128, num_train_examples=12800),
    "fuzzy_in_context_recall": dict(vocab_size=16, seq_len=128, num_train_examples=12800,
                                    k_motif_size=3, v_motif_size=3),
    "noisy_in_context_recall": dict(vocab_size=32, noise_vocab_size=16, seq_len=128,
                                    num_train_examples=12800, frac_noise=0.2),
    "selective_copying": dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16,
                              num_train_examples=12800),
    "compression": dict(vocab_size=16, seq_len=32, num_train_examples=12800),
    "memorization": dict(vocab_size=256, seq_len=32, num_train_examples=256),
}
_RECALL_CHANGES = dict(vocab_size=[32, 64, 128], seq_len=[256, 512, 1024],
                       num_train_examples=[6400, 3200, 1600, 800])
CHANGES: dict[str, dict[str, list]] = {
    "in_context_recall": _RECALL_CHANGES,
    "fuzzy_in_context_recall": _RECALL_CHANGES,
    "noisy_in_context_recall": dict(vocab_size=[48, 80, 144], seq_len=[256, 512, 1024],
                                    num_train_examples=[6400, 3200, 1600, 800],
                                    frac_noise=[0.4, 0.6, 0.8]),
    "selective_copying": dict(vocab_size=[32, 64, 128], seq_len=[512, 1024],
                              num_train_examples=[6400, 3200, 1600, 800],
                              num_tokens_to_copy=[32, 64, 96]),
    "compression": dict(vocab_size=[32, 64, 128], seq_len=[64, 128, 256],
                        num_train_examples=[6400, 3200, 1600, 800]),
    "memorization": dict(vocab_size=[512, 1024, 2048, 4096, 8192]),
}
# MAD's sweep (mad/configs.py): every setting at every (lr, weight decay); the best run counts.
LEARNING_RATES = (1e-4, 5e-4, 1e-3)
WEIGHT_DECAYS = (0.0, 0.1)
AUTOENCODER_TASKS = ("compression",)  # benchmark.py: these use MAD's AutoEncoder backbone


def _task(task: str) -> None:
  _check(task in TASKS, "task", task, "one of " + ", ".join(TASKS))


def settings(task: str) -> list[tuple[str, dict]]:
  """(name, kwargs) of every setting of ``task``: ``baseline`` first, then one per change
  (``seq_len=256`` ...); kwargs hold the generator's arguments and ``num_train_examples``."""
  _task(task)
  out = [("baseline", dict(BASELINES[task]))]
  for key, values in CHANGES[task].items():
    for value in values:
      out.append((f"{key}={value}", {**BASELINES[task], key: value}))
  return out


def setting(task: str, name: str) -> dict:
  """The kwargs of setting ``name`` (``baseline`` or ``key=value`` from ``settings``)."""
  table = dict(settings(task))
  _check(name in table, f"{task} setting", name, "one of " + ", ".join(table))
  return table[name]


def dataset(task: str, split: str, kwargs: dict, n: int | None = None, seed: int = 0):
  """``n`` examples (default: ``num_train_examples`` for train, 1280 for test) of ``task``
  with setting ``kwargs``, from ``default_rng([seed, split])``: (inputs [n, L], targets [n, L])
  int32."""
  _task(task)
  _check(split in SPLITS, "split", split, "one of " + ", ".join(SPLITS))
  kw = {k: v for k, v in kwargs.items() if k != "num_train_examples"}
  if n is None:
    n = kwargs.get("num_train_examples", 0) if split == "train" else NUM_TEST_EXAMPLES
  _check(isinstance(n, (int, np.integer)) and n >= 1, "number of examples", n,
         "a positive integer")
  if task == "memorization":  # built once, as MADConfig.instance_fn_kwargs does
    kw["kv_map"] = memorization_map(kw.get("vocab_size", 256), kw.get("noise_vocab_size", 0))
  rng = np.random.default_rng([seed, SPLITS[split]])
  rows = [TASKS[task](rng, is_training=split == "train", **kw) for _ in range(n)]
  return (np.stack([r[0] for r in rows]).astype(np.int32),
          np.stack([r[1] for r in rows]).astype(np.int32))


def overlap(train_inputs: np.ndarray, test_inputs: np.ndarray) -> float:
  """The fraction of distinct test input sequences that also occur in training (MAD's
  ``check_for_leakage`` warns above 0.001)."""
  train = {r.tobytes() for r in np.ascontiguousarray(train_inputs)}
  test = {r.tobytes() for r in np.ascontiguousarray(test_inputs)}
  return len(test & train) / max(len(test), 1)
