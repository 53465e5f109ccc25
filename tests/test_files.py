"""``sh2_jax.files``: a write that fails leaves the old file and no temporary behind; a write
that succeeds replaces it whole; JSON goes the same way."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sh2_jax import files


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
  path = str(tmp_path / "state.npz")
  files.write_atomic(path, lambda tmp: np.savez(tmp, a=np.arange(3)))
  assert np.load(path)["a"].tolist() == [0, 1, 2]

  def half(tmp):
    with open(tmp, "wb") as f:
      f.write(b"PK half")
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    files.write_atomic(path, half)
  assert np.load(path)["a"].tolist() == [0, 1, 2]  # the old file, untouched
  assert os.listdir(tmp_path) == ["state.npz"]  # no temporary left


def test_write_json(tmp_path):
  path = str(tmp_path / "r.json")
  files.write_json(path, {"a": [1, 2]})
  files.write_json(path, {"b": 3})
  assert json.load(open(path)) == {"b": 3} and os.listdir(tmp_path) == ["r.json"]


def test_write_bytes_atomic_writes_a_set_whole_or_not_at_all(tmp_path, monkeypatch):
  a, b = str(tmp_path / "x.tar.gz"), str(tmp_path / "x.tar.gz.2")
  files.write_bytes_atomic({a: b"old1", b: b"old2"})
  real_open, seen = open, []

  def failing_open(path, mode="r", *args, **kw):  # the second temporary cannot be written
    seen.append(path)
    if "w" in mode and len(seen) == 2:
      raise OSError("disk full")
    return real_open(path, mode, *args, **kw)
  monkeypatch.setattr("builtins.open", failing_open)
  with pytest.raises(OSError, match="disk full"):
    files.write_bytes_atomic({a: b"new1", b: b"new2"})
  monkeypatch.undo()
  assert [open(p, "rb").read() for p in (a, b)] == [b"old1", b"old2"]
  assert sorted(os.listdir(tmp_path)) == ["x.tar.gz", "x.tar.gz.2"]  # no temporary left
  files.write_bytes_atomic({a: b"new1", b: b"new2"})
  assert [open(p, "rb").read() for p in (a, b)] == [b"new1", b"new2"]
