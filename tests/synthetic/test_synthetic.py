"""Synthetic tasks (issue 9): determinism, answers re-derived by an independent parse of each
sequence, exact answer masks, accuracy metrics, the trainer data hook, and a CPU-sized sweep
that learns MQAR with the hybrid layout."""

from __future__ import annotations

import numpy as np
import pytest

from sh2_jax.synthetic import metrics
from sh2_jax.synthetic.data import SyntheticExamples, parse_format
from sh2_jax.synthetic.tasks import BASE, BLANK, END, SEP, TASKS, TaskSpec
from sh2_jax.tokenizer import PAD_ID

# (task, seq_len, params): odd lengths, gaps, multi-token values, tight and loose fits.
CASES = [
    ("ar", 37, dict(n_pairs=6, vocab=10)),
    ("ar", 13, dict(n_pairs=6, vocab=6)),  # no room for filler: pairs then the query
    ("mqar", 65, dict(n_pairs=8, n_queries=5, vocab=40, gap=7)),
    ("mqar", 31, dict(n_pairs=8, vocab=8)),  # every key queried, no free position
    ("mtr", 77, dict(n_pairs=5, n_queries=3, vocab=12, value_len=4, gap=3)),
    ("mtr", 50, dict(n_pairs=6, vocab=20, value_len=2)),
    ("selective_copy", 41, dict(n_tokens=9, vocab=5)),
    ("selective_copy", 16, dict(n_tokens=8, vocab=30)),
    ("compression", 45, dict(n_tokens=11, vocab=7, noise_vocab=9)),
    ("compression", 23, dict(n_tokens=11, vocab=3, noise_vocab=1)),
]


def _recall_truth(seq, n_pairs, vocab, value_len, n_queries):
  """Re-derive every answer from the raw tokens: read the pairs, then each key after them must
  be followed by its value; returns the expected (weights, query_ids) over target positions."""
  ctx = n_pairs * (1 + value_len)
  table = {}
  for i in range(0, ctx, 1 + value_len):
    key, value = int(seq[i]), tuple(int(x) for x in seq[i + 1:i + 1 + value_len])
    assert BASE <= key < BASE + vocab and key not in table
    assert all(BASE + vocab <= v < BASE + 2 * vocab for v in value)
    table[key] = value
  weights = np.zeros(len(seq) - 1, np.float32)
  qids = np.full(len(seq) - 1, -1, np.int32)
  p, q, seen = ctx, 0, set()
  while p < len(seq):
    tok = int(seq[p])
    if tok == BLANK:
      p += 1
      continue
    assert tok in table and tok not in seen, f"unexpected token {tok} at {p}"
    seen.add(tok)
    assert tuple(int(x) for x in seq[p + 1:p + 1 + value_len]) == table[tok]
    weights[p:p + value_len] = 1.0  # targets p .. p + m - 1 are tokens p + 1 .. p + m
    qids[p:p + value_len] = q
    p, q = p + 1 + value_len, q + 1
  assert q == n_queries
  return weights, qids


def _copy_truth(seq, task, params):
  (sep,) = np.flatnonzero(seq == SEP)
  vocab = params["vocab"]
  before = seq[:sep]
  data = before[(before >= BASE) & (before < BASE + vocab)]
  if task == "selective_copy":
    assert np.all((before == BLANK) | ((before >= BASE) & (before < BASE + vocab)))
    assert len(data) == params["n_tokens"]
    expected = data
  else:
    noise = before[(before < BASE) | (before >= BASE + vocab)]
    assert np.all((noise >= BASE + vocab) & (noise < BASE + vocab + params["noise_vocab"]))
    assert (params["n_tokens"] + 1) // 2 <= len(data) <= params["n_tokens"]
    expected = np.concatenate([data, [END]])
    assert np.all(seq[sep + 1 + len(expected):] == PAD_ID)
  np.testing.assert_array_equal(seq[sep + 1:sep + 1 + len(expected)], expected)
  weights = np.zeros(len(seq) - 1, np.float32)
  weights[sep:sep + len(expected)] = 1.0
  qids = np.where(weights > 0, 0, -1).astype(np.int32)
  return weights, qids


@pytest.mark.parametrize("task,seq_len,params", CASES)
def test_answers_and_masks_rederived_independently(task, seq_len, params):
  spec = TaskSpec.make(task, seq_len, seed=3, **params)
  for i in range(40):
    ex = spec.example("train", i)
    seq = ex.seq
    assert seq.shape == (seq_len + 1,) and seq.dtype == np.int32
    assert seq.min() >= 0 and seq.max() < 256  # byte-level
    if task in ("ar", "mqar", "mtr"):
      m = params.get("value_len", 1)
      nq = 1 if task == "ar" else (params.get("n_queries") or params["n_pairs"])
      weights, qids = _recall_truth(seq, params["n_pairs"], params["vocab"], m, nq)
      if task == "ar":  # the query is the last input token, its value the last target
        assert weights[-1] == 1 and weights[:-1].sum() == 0
    else:
      weights, qids = _copy_truth(seq, task, params)
    np.testing.assert_array_equal(ex.weights, weights)
    np.testing.assert_array_equal(ex.query_ids, qids)
    d = ex.as_dict()
    np.testing.assert_array_equal(d["targets"][:-1], d["inputs"][1:])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_per_seed_and_split(task):
  spec = TaskSpec.make(task, 64, seed=5)
  a, b = spec.batch("train", 10, 6), spec.batch("train", 10, 6)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(spec.example("train", 12).seq, a["inputs"][2].tolist()
                                + [a["targets"][2][-1]])  # random access = the batch's row
  other_seed = TaskSpec.make(task, 64, seed=6).batch("train", 10, 6)
  other_split = spec.batch("eval", 10, 6)
  assert not np.array_equal(a["inputs"], other_seed["inputs"])
  assert not np.array_equal(a["inputs"], other_split["inputs"])


def test_examples_vary():
  spec = TaskSpec.make("mqar", 64, seed=0, n_pairs=8, vocab=32)
  seqs = {spec.example("train", i).seq.tobytes() for i in range(50)}
  assert len(seqs) == 50


@pytest.mark.parametrize("make,match", [
    (lambda: TaskSpec.make("nope", 32), "task 'nope'"),
    (lambda: TaskSpec.make("mqar", 32, n_paris=4), "parameter 'n_paris'"),
    (lambda: TaskSpec.make("mqar", 20, n_pairs=8), "seq_len 20 .* at least 31"),
    (lambda: TaskSpec.make("mqar", 64, n_pairs=8, n_queries=9), "n_queries 9"),
    (lambda: TaskSpec.make("mqar", 64, vocab=200), "vocab 200"),
    (lambda: TaskSpec.make("mqar", 64, n_pairs=9, vocab=8), "n_pairs 9"),
    (lambda: TaskSpec.make("mqar", 64, gap=-1), "gap -1"),
    (lambda: TaskSpec.make("selective_copy", 10, n_tokens=8), "seq_len 10"),
    (lambda: TaskSpec.make("compression", 64, vocab=200, noise_vocab=100), "vocab 200"),
    (lambda: parse_format("synthetic:mqar:n_pairs", 64), "'n_pairs' is not key=integer"),
    (lambda: parse_format("synthetic:copy", 64), "unknown synthetic task 'copy'"),
])
def test_bad_parameters_name_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_accuracy_per_token_and_per_query():
  spec = TaskSpec.make("mtr", 40, seed=1, n_pairs=4, vocab=10, value_len=3)
  b = spec.batch("eval", 0, 3)
  pred = b["targets"].copy()
  perfect = metrics.accuracy(pred, b["targets"], b["weights"], b["query_ids"])
  assert perfect == {"token_acc": 1.0, "query_acc": 1.0}
  # Break one answer token of query 2 in row 0 and every non-answer position everywhere.
  pred[b["weights"] == 0] = 7
  pos = np.flatnonzero(b["query_ids"][0] == 2)[1]
  pred[0, pos] = 7
  c = metrics.accuracy_counts(pred, b["targets"], b["weights"], b["query_ids"])
  assert c == {"tokens": 36, "tokens_correct": 35, "queries": 12, "queries_correct": 11}
  with pytest.raises(ValueError, match="same"):
    metrics.accuracy(pred[:, :-1], b["targets"], b["weights"], b["query_ids"])


def test_trainer_data_hook():
  """``data.format = synthetic:...`` through the trainer's own pipeline factory: masked
  weights, eval padding to whole batches, the same batches for the same seed."""
  import ml_collections
  from sh2_jax.data import pipeline
  data_cfg = ml_collections.ConfigDict(dict(
      path="", format="synthetic:mqar:n_pairs=4,vocab=16,n_eval=5,seed=2", eval_fraction=0.05,
      upper_case=False, n_handling="keep"))
  train_src, eval_src = pipeline.load_dataset(data_cfg, 32)
  assert isinstance(train_src, SyntheticExamples) and len(eval_src) == 5
  first = next(pipeline.train_iterator(train_src, 4, seed=0))
  again = next(pipeline.train_iterator(train_src, 4, seed=0))
  assert set(first) == {"inputs", "targets", "weights"}
  np.testing.assert_array_equal(first["inputs"], again["inputs"])
  assert first["inputs"].shape == (4, 32) and np.all(first["weights"].sum(1) == 4)
  batches = list(pipeline.eval_batches(eval_src, 4))
  assert len(batches) == 2
  w = np.concatenate([x["weights"] for x in batches])
  assert w.sum() == 5 * 4 and np.all(w[5:] == 0)  # three zero-weight fillers
  spec = TaskSpec.make("mqar", 32, seed=2, n_pairs=4, vocab=16)
  np.testing.assert_array_equal(batches[0]["inputs"], spec.batch("eval", 0, 4)["inputs"])
  data_cfg.path = "some/file.txt"
  with pytest.raises(ValueError, match="data.path 'some/file.txt' is not used"):
    pipeline.load_dataset(data_cfg, 32)


def test_sweep_schedule_is_the_trainers():
  """The sweep feeds the trainer's schedule in as factors on a constant-rate AdamW."""
  import types
  from sh2_jax.train.synthetic_sweep import SweepConfig
  from sh2_jax.train.optim import learning_rate_schedule
  cfg = SweepConfig(steps=50, learning_rate=3e-3)
  ref = learning_rate_schedule(types.SimpleNamespace(
      learning_rate=3e-3, warmup_steps=5, min_lr_ratio=cfg.min_lr_ratio), 50)
  np.testing.assert_allclose(cfg.lr_factors() * 3e-3, [ref(t) for t in range(50)], rtol=1e-5,
                             atol=1e-9)


def test_cpu_sweep_learns_mqar_with_the_hybrid():
  """The hybrid SE-MR-LI-MHA learns easy MQAR well above chance (1/8) and above the 1/4 of a
  model that only knows which values are in the context."""
  from sh2_jax.train.synthetic_sweep import SweepConfig, make_pools, train_layout
  cfg = SweepConfig(d_model=64, num_layers=4, num_heads=2, mlp_hidden=128, steps=400,
                    batch_size=32, learning_rate=2e-3, n_train=4096, n_eval=256,
                    steps_per_call=100)
  specs = [TaskSpec.make("mqar", 24, seed=0, n_pairs=4, vocab=8)]
  train_pool = make_pools(specs, cfg.n_train, "train", 24)
  eval_pool = make_pools(specs, cfg.n_eval, "eval", 24)
  (record,) = train_layout(cfg, "SE-MR-LI-MHA", specs, train_pool, eval_pool)
  print(record)
  assert record["query_acc"] > 0.4, record
