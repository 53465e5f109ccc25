"""Byte data: readers, FASTA, packing, the held-out split, Grain iterators."""

import gzip
import json

import ml_collections
import numpy as np
import pytest

from sh2_jax import tokenizer
from sh2_jax.data import packing, pipeline, readers


def data_cfg(path, **kw):
  d = dict(path=str(path), format="auto", eval_fraction=0.0, upper_case=False, n_handling="keep")
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_empty_file_is_an_error(tmp_path):
  f = tmp_path / "empty.txt"
  f.write_bytes(b"")
  with pytest.raises(ValueError, match=r"data file .*empty\.txt' is empty"):
    pipeline.load_dataset(data_cfg(f), 16)


def test_missing_path_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"data path .*nope' does not exist"):
    pipeline.load_dataset(data_cfg(tmp_path / "nope"), 16)


def test_fasta_without_sequences_is_an_error(tmp_path):
  f = tmp_path / "headers.fa"
  f.write_bytes(b">chr1 only a header\n\n>chr2\n;comment\n")
  with pytest.raises(ValueError, match=r"FASTA file .*headers\.fa' has no sequences"):
    pipeline.load_dataset(data_cfg(f), 16)


def test_non_utf8_bytes_are_kept(tmp_path):
  raw = bytes([0xff, 0xfe, 0x80, 0x41, 0xc3, 0x28, 0x0a])  # invalid UTF-8 throughout
  f = tmp_path / "latin.txt"
  f.write_bytes(raw)
  train, _ = pipeline.load_dataset(data_cfg(f), 4)
  assert train.stream.tolist() == list(raw) + [tokenizer.EOD_ID]


def test_fasta_headers_dropped_upper_and_n(tmp_path):
  text = b">seq1 desc\nacgtN\nAC\n>seq2\nNNGG\n"
  f = tmp_path / "x.fasta.gz"
  f.write_bytes(gzip.compress(text))
  assert readers.read_documents(str(f)) == [b"acgtNAC", b"NNGG"]
  assert readers.read_documents(str(f), upper=True) == [b"ACGTNAC", b"NNGG"]
  assert readers.read_documents(str(f), upper=True, n_handling="drop") == [b"ACGTAC", b"GG"]
  with pytest.raises(ValueError, match="n_handling 'mask'"):
    readers.read_documents(str(f), n_handling="mask")


def test_corrupt_gzip_is_an_error(tmp_path):
  f = tmp_path / "bad.fa.gz"
  f.write_bytes(b"\x1f\x8b" + b"not really gzip")
  with pytest.raises(ValueError, match="cannot be decompressed"):
    readers.read_documents(str(f))


def test_directory_reads_sorted_skips_empty_and_hidden(tmp_path):
  (tmp_path / "b.txt").write_bytes(b"second")
  (tmp_path / "a.txt").write_bytes(b"first")
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / ".hidden").write_bytes(b"secret")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.fa").write_bytes(b">h\nACGT\n")
  assert readers.read_documents(str(tmp_path)) == [b"first", b"second", b"ACGT"]
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "e.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="holds no non-empty files"):
    readers.read_documents(str(tmp_path / "d"))


def test_sequence_longer_than_context_spans_windows(tmp_path):
  seq = np.random.default_rng(0).choice(list(b"ACGT"), 50).astype(np.uint8).tobytes()
  f = tmp_path / "long.fa"
  f.write_bytes(b">long\n" + seq + b"\n>short\nTTT\n")
  train, _ = pipeline.load_dataset(data_cfg(f), 16)
  expect = list(seq) + [tokenizer.EOD_ID] + list(b"TTT") + [tokenizer.EOD_ID]  # 55 tokens
  assert len(train) == 4  # ceil((55 - 1) / 16)
  inputs = np.concatenate([train[i]["inputs"] for i in range(4)])
  targets = np.concatenate([train[i]["targets"] for i in range(4)])
  weights = np.concatenate([train[i]["weights"] for i in range(4)])
  assert inputs[:54].tolist() == expect[:54]
  assert targets[:54].tolist() == expect[1:]
  assert weights.tolist() == [1.0] * 54 + [0.0] * 10  # padding of the last window
  assert (targets[54:] == tokenizer.PAD_ID).all()


def test_split_windows_every_mth_is_held_out():
  train, held = packing.split_windows(10, 0.25)
  assert held.tolist() == [0, 4, 8] and train.tolist() == [1, 2, 3, 5, 6, 7, 9]
  assert packing.split_windows(5, 1.0)[0].size == 0
  with pytest.raises(ValueError, match="eval_fraction 1.5"):
    packing.split_windows(5, 1.5)


def _source(n_tokens=400, seq_len=8):
  stream = np.arange(n_tokens, dtype=np.int32) % 250 + 2
  return packing.PackedWindows(stream, seq_len, np.arange(packing.num_windows(n_tokens, seq_len)))


def test_train_iterator_resumes_and_splits_over_processes():
  src = _source()
  it = pipeline.train_iterator(src, 4, seed=3)
  first = [next(it)["inputs"] for _ in range(3)]
  state = it.get_state()
  rest = [next(it)["inputs"] for _ in range(20)]  # runs past one epoch (49 windows)
  again = pipeline.train_iterator(src, 4, seed=3)
  again.set_state(state)
  np.testing.assert_array_equal(np.stack(rest), np.stack([next(again)["inputs"] for _ in range(20)]))
  # Two processes hold the two halves of the same global batches.
  halves = [pipeline.train_iterator(src, 4, 3, p, 2) for p in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), first[step])
  # Epochs are reshuffled: the 2nd epoch's order differs from the 1st.
  it = pipeline.train_iterator(_source(n_tokens=65), 1, seed=3)
  order = [int(next(it)["inputs"][0, 0]) for _ in range(16)]
  assert sorted(order[:8]) == sorted(order[8:]) and order[:8] != order[8:]


def test_eval_batches_cover_every_window_once():
  src = _source(n_tokens=100, seq_len=8)  # 13 windows
  batches = list(pipeline.eval_batches(src, 4))
  assert len(batches) == pipeline.num_eval_batches(src, 4) == 4
  w = np.concatenate([b["weights"] for b in batches])
  assert w.sum() == 99 and w[13:].sum() == 0
  with pytest.raises(ValueError, match="held-out split is empty"):
    list(pipeline.eval_batches(packing.PackedWindows(src.stream, 8, np.arange(0)), 4))
  with pytest.raises(ValueError, match="training split is empty"):
    pipeline.train_iterator(packing.PackedWindows(src.stream, 8, np.arange(0)), 4, 0)


def test_default_corpus_loads():
  train, held = pipeline.load_dataset(data_cfg("", eval_fraction=0.05), 128)
  assert len(train) > 500 and len(held) > 20


def test_jsonl_lines_are_documents(tmp_path):
  """OpenGenome2's layout: one {"text": ...} object per line, each one document (gzip too)."""
  lines = [{"text": "ACGTAC", "id": 1}, {"text": "héllo"}, {"text": ""}, {"text": "GG"}]
  raw = "\n".join(json.dumps(x) for x in lines).encode() + b"\n\n"
  (tmp_path / "a.jsonl").write_bytes(raw)
  (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
  docs = [b"ACGTAC", "héllo".encode(), b"GG"]
  assert readers.read_documents(str(tmp_path / "a.jsonl")) == docs
  assert readers.read_documents(str(tmp_path), upper=True) == [d.upper() for d in docs] * 2
  train, _ = pipeline.load_dataset(data_cfg(tmp_path / "a.jsonl"), 4)
  assert len(train) == (6 + 6 + 2 + 3) // 4  # each document + EOD, packed into windows of 4


@pytest.mark.parametrize("line,message", [
    (b'{"text": "AC"}\n{"text": "AC"', r"line 2 is not JSON"),
    (b'{"seq": "AC"}',
     r"line 1: expected an object with a string 'text' field; got keys \['seq'\]"),
    (b'["AC"]', r"line 1: .* got a JSON list"),
    (b'{"text": 5}', r"line 1: expected an object with a string 'text'"),
])
def test_bad_jsonl_names_the_line(tmp_path, line, message):
  (tmp_path / "x.jsonl").write_bytes(line)
  with pytest.raises(ValueError, match=message):
    readers.read_documents(str(tmp_path / "x.jsonl"))


def test_unknown_extension_is_an_error_not_text(tmp_path):
  (tmp_path / "notes.csv").write_bytes(b"a,b\n")
  with pytest.raises(ValueError, match=r"data file .*notes\.csv' has an unknown extension; "
                                       r"expected one of \.txt, \.text, \.fa, .*\.jsonl"):
    readers.read_documents(str(tmp_path / "notes.csv"))
  (tmp_path / "ok.txt").write_bytes(b"text")
  with pytest.raises(ValueError, match=r"notes\.csv' has an unknown extension"):
    readers.read_documents(str(tmp_path))  # inside a directory too, before anything is read
  assert readers.read_documents(str(tmp_path / "notes.csv"), fmt="text") == [b"a,b\n"]
  assert readers.file_format("x.FA.gz") == "fasta"
  assert readers.file_format("y", "jsonl") == "jsonl"


def test_one_fasta_parser_for_training_and_prompts(tmp_path):
  raw = b"ACGT\n>one first\nAC\n;comment\nGT\n\n>two\n>three\nTT\n"
  assert readers.fasta_records(raw) == [(None, b"ACGT"), (b"one first", b"ACGT"), (b"two", b""),
                                        (b"three", b"TT")]
  assert readers.parse_fasta(raw) == [b"ACGT", b"ACGT", b"TT"]  # training: every sequence
  f = tmp_path / "p.fa"
  f.write_bytes(b">one first\nAC\nGT\n>two\nTT\n")
  assert readers.read_fasta(str(f)) == [("one first", b"ACGT"), ("two", b"TT")]
  for content, message in [(raw, "sequence before the first '>' header"),
                           (b">a\nAC\n>b\n", r"record\(s\) \['b'\] have no sequence"),
                           (b"\n\n", "holds no FASTA records"),
                           (b">a\n\x00\xff", "is not a text FASTA file")]:
    f.write_bytes(content)
    with pytest.raises(ValueError, match=message):
      readers.read_fasta(str(f))
