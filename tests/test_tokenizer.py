import numpy as np
import pytest

from sh2_jax import tokenizer


def test_round_trip_text_and_bytes():
  for s in ["ACGTNacgtn", "héllo ✓", ""]:
    assert tokenizer.decode(tokenizer.encode(s)).decode("utf-8") == s
  raw = bytes(range(2, 256))
  assert tokenizer.decode(tokenizer.encode(raw)) == raw


def test_special_ids_and_padding():
  toks, lens = tokenizer.pad_batch(["ACGT", "AC"])
  assert toks.dtype == np.int32 and toks.shape == (2, 4)
  assert list(lens) == [4, 2] and list(toks[1]) == [65, 67, 1, 1]
  assert tokenizer.decode(toks[1]) == b"AC"
  assert tokenizer.decode([65, tokenizer.EOD_ID, 300, 66]) == b"AB"
  with pytest.raises(ValueError, match="token id 600 is outside the vocabulary 0..511"):
    tokenizer.decode([600])
  with pytest.raises(ValueError, match="does not fit length 3"):
    tokenizer.pad_batch(["ACGT"], length=3)
  with pytest.raises(TypeError, match="str or bytes"):
    tokenizer.encode(5)
