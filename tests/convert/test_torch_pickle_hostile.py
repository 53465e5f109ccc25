"""The .pt reader against crafted and mutated files: every bad file is one ``CheckpointError``
naming the file and the entry, refused before anything is allocated; nothing crashes."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from sh2_jax.convert import torch_pickle
from sh2_jax.convert.torch_pickle import CheckpointError

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
PT = os.path.join(FIX, "vortex_tiny", "state_dict.pt")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# A tiny pickle assembler (protocol 2 opcodes), so the tests craft files without torch.
def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
  return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
  return b"(" + b"".join(items) + b"t"


def tensor(key="0", offset=0, size=(4,), stride=(1,), storage="FloatStorage", numel=4) -> bytes:
  persid = _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"),
                   _int(numel)]) + b"Q"
  args = _tuple([persid, _int(offset), _tuple([_int(s) for s in size]),
                 _tuple([_int(s) for s in stride]), b"\x89",
                 _global("collections", "OrderedDict") + b")R"])
  return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def state_pickle(entries: dict[str, bytes]) -> bytes:
  body = b"".join(_str(k) + v + b"s" for k, v in entries.items())
  return b"\x80\x02}" + body + b"."


def archive(path, pkl: bytes, storages: dict[str, bytes], method=zipfile.ZIP_STORED) -> str:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      z.writestr(zipfile.ZipInfo(f"archive/data/{key}"), data, compress_type=method)
  return str(path)


FLOATS = np.arange(4, dtype=np.float32).tobytes()


def test_a_crafted_file_of_the_right_form_loads(tmp_path):
  path = archive(tmp_path / "ok.pt", state_pickle({"w": tensor(size=(2, 2), stride=(2, 1))}),
                 {"0": FLOATS})
  np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["w"], [[0, 1], [2, 3]])


@pytest.mark.parametrize("kw,message", [
    (dict(stride=(-1,)), "negative entry"),
    (dict(size=(-2,)), "negative entry"),
    (dict(offset=-3), "offset -3 is not a non-negative integer"),
    (dict(offset=2), "runs past its storage"),
    (dict(size=(2, 3), stride=(3, 1)), "runs past its storage"),
    (dict(size=(3,), stride=(2,)), "runs past its storage"),
    (dict(key="../../etc/passwd"), "is not a plain name"),
    (dict(key="9"), "storage entry 'archive/data/9' is missing"),
    (dict(storage="DoubleStorage"), "runs past its storage"),
    (dict(size=(2,), stride=(1, 1)), "differ in length"),
    (dict(size=(1 << 20, 4), stride=(0, 1)), "overlapping views are refused"),
])
def test_views_outside_their_storage_are_refused(tmp_path, kw, message):
  path = archive(tmp_path / "bad.pt", state_pickle({"w": tensor(**kw)}), {"0": FLOATS})
  with pytest.raises(CheckpointError, match=message) as e:
    torch_pickle.load_state_dict(path)
  assert "bad.pt" in str(e.value) and "data.pkl" in str(e.value)


def test_compressed_entries_are_refused_before_inflating(tmp_path):
  """A deflated storage of 64 MiB of zeros (a few KiB on disk) is refused from the directory,
  without reading it."""
  path = archive(tmp_path / "bomb.pt", state_pickle({"w": tensor(numel=1 << 24, size=(1 << 24,))}),
                 {"0": bytes(1 << 26)}, method=zipfile.ZIP_DEFLATED)
  assert os.path.getsize(path) < 1 << 20
  with pytest.raises(CheckpointError, match=r"'archive/data/0' is compressed"):
    torch_pickle.load_state_dict(path)


@pytest.mark.parametrize("pkl,message", [
    (b"\x80\x02" + _global("torch", "FloatStorage") + b")R.", "not a valid state dict pickle"),
    (b"\x80\x02" + _global("builtins", "eval") + b".", "refusing to load builtins.eval"),
    (b"\x80\x02]q\x00.", "holds a list, not a state dict"),
    (b"\x80\x02}" + _int(3) + _str("x") + b"s.", "key 3 is a int"),
    (b"\x80\x02}" + _str("w") + _tuple([_str("storage"), _int(5), _str("0")]) + b"Qs.",
     "unsupported storage type"),
    (b"\x80\x02}" + _str("w") + _str("x") + b"Q" + b"s.", "unsupported persistent id"),
    (b"\x80\x02}" + _str("w"), "not a valid state dict pickle"),
    (b"\x80\x02}" + _str("w") + _global("torch._utils", "_rebuild_tensor_v2")
     + _tuple([_tuple([_int(1)]), _int(0), _tuple([_int(1)]), _tuple([_int(1)])]) + b"Rs.",
     "storage is a tuple, not a storage"),
])
def test_bad_pickles_are_one_error(tmp_path, pkl, message):
  path = archive(tmp_path / "p.pt", pkl, {"0": FLOATS})
  with pytest.raises(CheckpointError, match=message):
    torch_pickle.load_state_dict(path)


def test_entry_past_the_end_of_the_file_is_refused(tmp_path):
  path = archive(tmp_path / "t.pt", state_pickle({"w": tensor()}), {"0": FLOATS * 1024})
  data = open(path, "rb").read()
  # Claim a larger size for the storage entry in its central-directory record.
  i = data.find(b"archive/data/0", data.find(b"PK\x01\x02"))
  rec = data.rfind(b"PK\x01\x02", 0, i)
  assert i >= 0 and rec >= 0
  bad = bytearray(data)
  bad[rec + 20:rec + 28] = struct.pack("<II", 1 << 30, 1 << 30)
  (tmp_path / "t2.pt").write_bytes(bytes(bad))
  with pytest.raises(CheckpointError, match="lies outside the file|not a torch.save zip"):
    torch_pickle.load_state_dict(str(tmp_path / "t2.pt"))


def test_converter_cli_refusal_is_one_error_line(tmp_path):
  path = archive(tmp_path / "neg.pt", state_pickle({"w": tensor(stride=(-1,))}), {"0": FLOATS})
  yml = os.path.join(FIX, "vortex_tiny", "config.yml")
  r = subprocess.run([sys.executable, "-m", "sh2_jax.convert", "--checkpoint", path, "--config",
                      yml, "--output", str(tmp_path / "out")], capture_output=True, text=True,
                     cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert lines[-1].startswith("error: ") and "neg.pt" in lines[-1] and "negative" in lines[-1]
  assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


FUZZ = r'''
import os, random, resource, sys, zipfile
import numpy as np
from sh2_jax.convert import torch_pickle
src, tmp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(src, "rb").read()
z = zipfile.ZipFile(src)
pkl = z.getinfo([i for i in z.namelist() if i.endswith("data.pkl")][0])
pkl_start = pkl.header_offset + 30 + len(pkl.filename.encode())
regions = [(pkl_start, pkl_start + pkl.file_size),            # the pickle
           (data.rfind(b"PK\x01\x02", 0, len(data) - 200) - 4096, len(data)),  # directory
           (0, 400)]                                           # first local headers
rng = random.Random(7)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # after imports
counts = {"refused": 0, "loaded": 0}
path = os.path.join(tmp, "m.pt")
for it in range(n):
  buf = bytearray(data)
  lo, hi = regions[it % len(regions)]
  lo = max(0, lo)
  for _ in range(rng.choice([1, 1, 2, 4, 16])):
    j = rng.randrange(lo, hi)
    buf[j] = rng.randrange(256) if rng.random() < 0.7 else buf[j] ^ (1 << rng.randrange(8))
  if rng.random() < 0.05:
    buf = buf[:rng.randrange(len(buf))]
  open(path, "wb").write(buf)
  try:
    sd = torch_pickle.load_state_dict(path)
  except torch_pickle.CheckpointError:
    counts["refused"] += 1
    continue
  for v in sd.values():   # every view readable: inside its storage, inside the file
    if isinstance(v, np.ndarray):
      np.asarray(v, np.float64).sum()
  counts["loaded"] += 1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - rss0
print(counts["refused"], counts["loaded"], rss)
'''


def test_fuzzed_archives_are_refused_or_load_never_crash(tmp_path):
  """300 mutations of the fixture's pickle, zip directory and local headers (random bytes, bit
  flips, truncations), in a subprocess so that a crash fails the test: each is refused with a
  CheckpointError or loads views that are all readable; the peak memory of the reading stays
  bounded (no view holds more elements than its storage)."""
  r = subprocess.run([sys.executable, "-c", FUZZ, PT, str(tmp_path), "300"], capture_output=True,
                     text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  refused, loaded, rss_mb = (int(x) for x in r.stdout.split())
  assert refused + loaded == 300 and refused > 100 and loaded > 10
  assert rss_mb < 100, f"peak RSS grew by {rss_mb} MiB while reading 1.5 MB files"
