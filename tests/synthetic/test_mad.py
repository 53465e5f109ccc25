"""MAD generators (issue 22): each task's statistics over many samples at MAD's baseline
settings -- vocabulary split, noise share, copy positions, motif sizes -- the loss mask (only
the positions MAD scores, re-derived here by an independent parse of each sequence),
determinism by seed, train/test disjointness, and the settings table."""

from __future__ import annotations

import numpy as np
import pytest

from sh2_jax.synthetic import mad

IGN = mad.IGNORE


def _data(task, split, n, **over):
  return mad.dataset(task, split, {**mad.BASELINES[task], **over}, n=n, seed=3)


def _recall_truth(seq, n_keys, content, multi_query=True):
  """Pairs of seq (the full seq_len tokens) -> the scored mask over seq: values of keys seen
  before (multi-query) and the final value; checks every key keeps one value."""
  table, scored = {}, np.zeros(len(seq), bool)
  for i in range(0, len(seq) - 2, 2):
    k, v = int(seq[i]), int(seq[i + 1])
    if k >= content:  # a noise pair
      assert v >= content
      continue
    assert k < n_keys <= v < content
    if k in table:
      assert table[k] == v
      scored[i + 1] = multi_query
    table[k] = v
  k, v = int(seq[-2]), int(seq[-1])
  assert table[k] == v  # the probe is a key seen before, with its value
  scored[-1] = True
  return scored


@pytest.mark.parametrize("task", ["in_context_recall", "noisy_in_context_recall"])
def test_recall_split_noise_and_mask(task):
  base = mad.BASELINES[task]
  n_noise = base.get("noise_vocab_size", 0)
  content = base["vocab_size"] - n_noise
  x, y = _data(task, "test", 400)
  xt, yt = _data(task, "train", 50)
  assert x.shape == (400, base["seq_len"] - 1)
  np.testing.assert_array_equal(yt[:, :-1], xt[:, 1:])  # training: every next token
  assert np.all(yt != IGN)
  noise_pairs = 0
  for xi, yi in zip(x, y):
    seq = np.concatenate([xi, [yi[-1]]])  # the final target completes the sequence
    scored = _recall_truth(seq, content // 2, content)
    np.testing.assert_array_equal(yi != IGN, scored[1:])
    np.testing.assert_array_equal(yi[scored[1:]], seq[1:][scored[1:]])
    noise_pairs += int(np.sum(seq[0:-2:2] >= content))
  share = noise_pairs / (400 * (base["seq_len"] // 2 - 1))
  assert abs(share - base.get("frac_noise", 0.0)) < 0.01
  if n_noise:
    assert x.max() == base["vocab_size"] - 1 and np.all(x[x >= content] < base["vocab_size"])


def test_fuzzy_recall_motifs_and_mask():
  base = mad.BASELINES["fuzzy_in_context_recall"]
  vocab, L = base["vocab_size"], base["seq_len"]
  content = vocab - 1
  x, y = _data("fuzzy_in_context_recall", "test", 200)
  xt, yt = _data("fuzzy_in_context_recall", "train", 100)
  assert x.shape == (200, L) and xt.shape == (100, L)
  np.testing.assert_array_equal(yt[:, :-1], xt[:, 1:])
  for xi, yi in zip(x, y):
    seq = np.concatenate([xi, [yi[-1]]])
    body = seq[seq != vocab - 1]  # the front padding (pad = vocab - 1) only
    assert np.all(seq[:len(seq) - len(body)] == vocab - 1)
    keys = body < content // 2
    assert np.all(body[~keys] < content)
    # split into alternating key / value runs: key runs are test-time always 3 long
    runs, cur = [], [body[0]]
    for a, b in zip(body[:-1], body[1:]):
      if (a < content // 2) == (b < content // 2):
        cur.append(b)
      else:
        runs.append(cur)
        cur = [b]
    runs.append(cur)
    pairs = list(zip(runs[0::2], runs[1::2]))
    assert sum(len(k) + len(v) for k, v in pairs) == len(body)
    assert all(len(k) == 3 and len(set(k)) == 3 for k, _ in pairs)
    assert all(1 <= len(v) <= 3 and len(set(v)) == len(v) for _, v in pairs)
    table, mask = {}, []
    for k, v in pairs[:-1]:  # values of keys seen before are scored; one value per key
      k, v = tuple(k), tuple(v)
      if k in table:
        assert table[k] == v
      mask += [False] * 3 + [k in table] * len(v)
      table[k] = v
    mask += [False] * 3 + [True] * len(pairs[-1][1])  # the final probe's value
    full = np.r_[np.zeros(len(seq) - len(body), bool), mask]
    np.testing.assert_array_equal(yi != IGN, full[1:])
    np.testing.assert_array_equal(yi[full[1:]], seq[1:][full[1:]])
  # training keys vary in size 1..3
  sizes = set()
  for xi in xt[:20]:
    body = xi[xi != vocab - 1]
    k = body < content // 2
    edges = np.flatnonzero(np.diff(np.r_[0, k.astype(int), 0]))
    sizes |= set((edges[1::2] - edges[0::2]).tolist())
  assert {1, 2, 3} <= sizes


def test_selective_copying_positions_and_mask():
  base = mad.BASELINES["selective_copying"]
  V, L, n = base["vocab_size"], base["seq_len"], base["num_tokens_to_copy"]
  for split in ("train", "test"):
    x, y = _data("selective_copying", split, 300)
    assert x.shape == y.shape == (300, L)
    copy_at = L - n - 1
    assert np.all(x[:, copy_at] == V - 1) and np.all(x[:, copy_at + 1:] == V - 2)
    assert np.all(y[:, :L - n] == IGN)
    head = x[:, :copy_at]
    content = head != V - 2
    assert np.all(content.sum(1) == n) and np.all(head[content] < V - 2)
    assert np.all(content[:, -1])  # blanks go before data tokens, never after the last
    np.testing.assert_array_equal(y[:, L - n:], head[content].reshape(300, n))
  # blanks are inserted before uniformly chosen data tokens: ~n_blank / n before each
  gaps = np.diff(np.c_[np.full(300, -1), np.flatnonzero(content.ravel()).reshape(300, n)
                       % copy_at], axis=1) - 1
  assert np.all(gaps.sum(1) == copy_at - n)
  assert np.allclose(gaps.mean(0), (copy_at - n) / n, atol=1.5)


def test_compression_and_memorization():
  V, L = 16, 32
  x, y = _data("compression", "test", 200)
  assert x.shape == (200, L) and np.all(x == y) and np.all(x[:, -1] == V - 1)
  assert np.all(x[:, :-1] < V - 1)
  counts = np.bincount(x[:, :-1].ravel(), minlength=V - 1)
  assert counts.min() > 0.8 * counts.mean()
  xn, _ = mad.dataset("compression", "train", dict(vocab_size=32, seq_len=64,
                      noise_vocab_size=8, frac_noise=0.3), n=200)
  noise = xn[:, :-1] >= 32 - 1 - 8
  assert abs(noise.mean() - 0.3) < 0.02 and np.all(xn[:, :-1] < 31)

  base = mad.BASELINES["memorization"]
  table = mad.memorization_map(base["vocab_size"])
  assert len(table) == 127 and len(set(table.tolist())) == 127
  assert table.min() >= 127 and table.max() <= 254
  for split in ("train", "test"):
    x, y = _data("memorization", split, 100)
    assert x.shape == (100, 32)
    assert np.all(x[:, 1::2] == 255) and np.all(y[:, 0::2] == IGN)
    np.testing.assert_array_equal(y[:, 1::2], table[x[:, 0::2]])


@pytest.mark.parametrize("task", list(mad.TASKS))
def test_determinism_and_disjoint_splits(task):
  a = _data(task, "test", 40)
  b = _data(task, "test", 40)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  other = mad.dataset(task, "test", mad.BASELINES[task], n=40, seed=4)
  assert not np.array_equal(a[0], other[0])
  train = _data(task, "train", 200)
  assert mad.overlap(train[0], a[0]) == 0.0
  assert mad.overlap(train[0], train[0][:10]) == 1.0


def test_settings_table():
  assert [name for name, _ in mad.settings("memorization")] == [
      "baseline", "vocab_size=512", "vocab_size=1024", "vocab_size=2048", "vocab_size=4096",
      "vocab_size=8192"]
  icr = dict(mad.settings("in_context_recall"))
  assert len(icr) == 11 and icr["seq_len=512"] == {**mad.BASELINES["in_context_recall"],
                                                   "seq_len": 512}
  assert len(mad.settings("noisy_in_context_recall")) == 14
  assert len(mad.settings("selective_copying")) == 13
  assert mad.BASELINES["in_context_recall"] == dict(vocab_size=16, seq_len=128,
                                                    num_train_examples=12800)
  for task in mad.TASKS:  # every setting generates
    for name, kw in mad.settings(task):
      x, y = mad.dataset(task, "test", kw, n=1)
      assert x.shape == y.shape and x.max() < kw["vocab_size"], (task, name)
  with pytest.raises(ValueError, match="setting 'nope' is not valid"):
    mad.setting("compression", "nope")
  with pytest.raises(ValueError, match="task 'x' is not valid"):
    mad.settings("x")


def test_single_query_recall_scores_only_the_probe():
  kw = dict(vocab_size=16, seq_len=32, multi_query=False)
  x, y = mad.dataset("in_context_recall", "test", kw, n=100)
  assert x.shape == (100, 32)  # the copy prefix adds a token
  assert np.all(x[:, -2] == 15) and np.all(x[:, :-2] < 15)  # prefix, then the probe key
  assert np.all((y != IGN).sum(1) == 1) and np.all(y[:, -1] != IGN)
  for xi, yi in zip(x, y):
    pairs = xi[:-2].reshape(-1, 2)
    assert yi[-1] == pairs[pairs[:, 0] == xi[-1]][0, 1]  # the probe key's value
