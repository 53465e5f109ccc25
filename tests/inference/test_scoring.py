"""Scoring at scale: batches equal one-at-a-time, strings equal ids, the reduce modes,
reverse-complement averaging, the segmented path, and the ``sh2-score --fasta`` command."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

from sh2_jax import tokenizer
from sh2_jax.inference.scoring import reverse_complement, score, sequence_scores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQS = ["ACGTTGCAAGTCCGATAGCTAGGCTTACGATCGGATCCGATTACGAGCTAGCATCGATCGACTGACTGATCGACAGTCA",
        "ACG", "TTGACCGTANNACGTTGCAtgcaGGCTAACG", "GGGCCCAAATTTGGGCCCAAATTTACGTACGTAAGC" * 2,
        "CA"]
def test_batches_equal_one_at_a_time(model):
  alone = [score(model, s) for s in SEQS]
  for batch_size in (None, 1, 2, 4):
    got = score(model, SEQS, batch_size=batch_size)
    assert [g.shape for g in got] == [(len(s) - 1,) for s in SEQS]
    for g, a in zip(got, alone):
      np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-5, err_msg=f"batch_size {batch_size}")
  # One-at-a-time scores differ between sequences: the check above can fail.
  assert abs(float(np.mean(alone[0])) - float(np.mean(alone[3]))) > 1e-3


def test_strings_equal_ids_and_reduce_modes(model):
  ids = [tokenizer.encode(s) for s in SEQS]
  by_str = score(model, SEQS)
  mixed = score(model, [SEQS[0], SEQS[1].encode(), ids[2], list(map(int, ids[3])), ids[4]])
  for a, b, c in zip(by_str, score(model, ids), mixed):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  np.testing.assert_allclose(score(model, SEQS[0]), by_str[0], rtol=1e-5)  # batch of 1
  means = sequence_scores(model, SEQS, batch_size=2)
  sums = sequence_scores(model, SEQS, "sum", batch_size=3)
  assert means.shape == sums.shape == (len(SEQS),) and means.dtype == np.float64
  np.testing.assert_allclose(means, [np.mean(x.astype(np.float64)) for x in by_str], rtol=1e-6)
  np.testing.assert_allclose(sums, [np.sum(x.astype(np.float64)) for x in by_str], rtol=1e-6)
  assert isinstance(score(model, SEQS[0], reduce="mean"), float)
  batch = np.stack([ids[0][:40], ids[0][10:50]])  # a [B, L] array keeps its shape
  assert score(model, batch).shape == (2, 39)
  np.testing.assert_allclose(score(model, batch, reduce="sum"), score(model, batch).sum(1),
                             rtol=1e-5)


def test_reverse_complement_averaging(model):
  assert tokenizer.decode(reverse_complement(tokenizer.encode("AACGTNcgta"))) == b"tacgNACGTT"
  seqs = ["ACGTTGCAAGTCCGATAG", "ggatcNNacgT"]
  rcs = ["CTATCGGACTTGCAACGT", "AcgtNNgatcc"]
  for reduce in ("mean", "sum"):
    got = sequence_scores(model, seqs, reduce, rc=True, batch_size=1)
    fwd, rev = sequence_scores(model, seqs, reduce), sequence_scores(model, rcs, reduce)
    np.testing.assert_allclose(got, (fwd + rev) / 2, rtol=1e-6)
    assert np.all(np.abs(fwd - rev) > 1e-4)  # the two strands score differently
  with pytest.raises(ValueError, match="sequence 1 has 'R' at position 3; reverse-complement "
                                       "averaging needs DNA"):
    sequence_scores(model, ["ACGT", "ACRT"], rc=True)
  with pytest.raises(ValueError, match="use reduce='mean' or 'sum'"):
    score(model, "ACGT", rc=True)


def test_segmented_scoring_equals_one_shot(model):
  plain = score(model, SEQS, batch_size=2)
  for got, ref in zip(score(model, SEQS, batch_size=2, segment_len=16), plain):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments(model):
  with pytest.raises(ValueError, match="reduce 'max' is not one of 'mean', 'sum', 'none'"):
    score(model, SEQS, reduce="max")
  with pytest.raises(ValueError, match="batch_size 0 must be None or a positive integer"):
    score(model, SEQS, batch_size=0)
  with pytest.raises(ValueError, match="sequence 1 of 300 tokens is more than the "
                                       "model's max_seqlen 256"):
    score(model, ["ACGT", "A" * 300])
  with pytest.raises(ValueError, match=r"sequence\(s\) \[0\] have fewer than 2 tokens"):
    score(model, ["A", "ACGT"])
  with pytest.raises(TypeError, match="for one, use score"):
    sequence_scores(model, "ACGT")


# ------------------------------------------------------------------------------ sh2-score
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
  from sh2_jax.checkpoint import save_model
  path = str(tmp_path_factory.mktemp("score") / "ckpt")
  save_model(path, model)
  return path


def _score_cli(args):
  return subprocess.run([sys.executable, "-m", "sh2_jax.cli.score", *args], capture_output=True,
                        text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=300)


def test_score_command(tmp_path, model, checkpoint):
  fasta = tmp_path / "in.fa"
  fasta.write_text("".join(f">seq{i} some description\n{s}\n" for i, s in enumerate(SEQS)))
  out = tmp_path / "scores.tsv"
  r = _score_cli([f"--model={checkpoint}", f"--fasta={fasta}", f"--out={out}",
                  "--batch_size=2", "--reduce=sum"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "score: 100%" in r.stderr  # the progress bar
  rows = [line.split("\t") for line in out.read_text().splitlines()]
  assert rows[0] == ["name", "length", "sum_loglik"]
  assert [row[:2] for row in rows[1:]] == [[f"seq{i}", str(len(s))] for i, s in enumerate(SEQS)]
  np.testing.assert_allclose([float(row[2]) for row in rows[1:]],
                             sequence_scores(model, SEQS, "sum"), rtol=1e-5)
  per_token = tmp_path / "tokens.tsv"
  r = _score_cli([f"--model={checkpoint}", f"--fasta={fasta}", f"--out={per_token}",
                  "--reduce=none"])
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line.split("\t") for line in per_token.read_text().splitlines()[1:]]
  assert len(rows) == sum(len(s) - 1 for s in SEQS)
  assert rows[0][:3] == ["seq0", "2", "C"]
  np.testing.assert_allclose([float(r[3]) for r in rows[:len(SEQS[0]) - 1]],
                             score(model, SEQS[0]), rtol=1e-5, atol=1e-6)


def test_score_command_bad_inputs(tmp_path, checkpoint):
  fasta = tmp_path / "in.fa"
  fasta.write_text(">a\nACGTACGT\n>b\nACGXACGT\n")
  out = tmp_path / "out.tsv"
  ck = f"--model={checkpoint}"
  cases = [
      ([ck, f"--fasta={tmp_path / 'none.fa'}", f"--out={out}"], "--fasta "),
      ([ck, f"--fasta={fasta}", f"--out={out}", "--reduce=max"], "--reduce"),
      ([ck, f"--fasta={fasta}", f"--out={out}", "--rc"], "--fasta record 'b' has 'X' at "
                                                         "position 4"),
      ([ck, f"--fasta={fasta}", f"--out={out}", "--rc", "--reduce=none"], "--rc averages"),
      ([ck, f"--fasta={fasta}", f"--out={tmp_path / 'no' / 'out.tsv'}"], "does not exist"),
      ([ck, f"--fasta={fasta}", f"--out={out}", "--batch_size=0"], "--batch_size 0"),
      ([ck, f"--out={out}"], "give exactly one of --fasta"),
      (["--model=nope", f"--fasta={fasta}", f"--out={out}"], "'nope' is neither"),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(_score_cli, [args for args, _ in cases]))
  for (args, message), r in zip(cases, results):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (args, r.stderr[-1500:])
    assert lines[-1].startswith("error: ") and message in lines[-1], (args, lines[-2:])
    assert "Traceback" not in r.stderr, args
    assert not out.exists(), args
