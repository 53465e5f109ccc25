"""Read a PyTorch ``torch.save`` zip archive without torch, and without executing anything.

A ``.pt`` file is a zip holding ``<prefix>/data.pkl`` (a pickle whose tensors reference
storages by key) and ``<prefix>/data/<key>`` (raw little-endian storage bytes). The restricted
unpickler below knows a fixed allow-list of globals — tensor rebuilding, storage dtypes,
``OrderedDict``, and the ``io.BytesIO`` blobs Transformer Engine stores as ``_extra_state`` — and
refuses everything else. Tensors come back as read-only ``numpy.memmap`` views of the archive
(zip entries are stored uncompressed), so a 40B checkpoint streams instead of loading whole.
Checkpoints cut into byte shards (``X.pt.part0``, ``X.pt.part1`` …) are read as one file.
"""

from __future__ import annotations

import collections
import glob
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class BytesBlob:
  """Stands in for a pickled ``io.BytesIO`` (e.g. a Transformer Engine ``_extra_state``):
  keeps its bytes, never executes anything."""

  def __init__(self, *args):
    self.data = b""

  def __setstate__(self, state):
    if isinstance(state, tuple) and state and isinstance(state[0], (bytes, bytearray)):
      self.data = bytes(state[0])

  def getvalue(self) -> bytes:
    return self.data


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _LazyStorage:
  def __init__(self, archive: "_Archive", key: str, dtype: np.dtype):
    self.archive, self.key, self.dtype = archive, key, dtype

  def array(self) -> np.ndarray:
    return self.archive.storage(self.key, self.dtype)


def _rebuild_tensor(storage: _LazyStorage, offset, size, stride, *unused) -> np.ndarray:
  flat = storage.array()
  size, stride = tuple(size), tuple(stride)
  if not size:
    return flat[offset:offset + 1].reshape(())
  item = flat.dtype.itemsize
  needed = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
  if needed > flat.size:
    raise ValueError(f"tensor of size {size} stride {stride} runs past its storage "
                     f"({flat.size} elements)")
  return np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False)


def _encode(text: str, encoding: str = "latin1") -> bytes:
  if encoding != "latin1":
    raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode("latin1")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_io", "BytesIO"): BytesBlob,
    ("io", "BytesIO"): BytesBlob,
    ("_codecs", "encode"): _encode,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, fp, archive: "_Archive"):
    super().__init__(fp)
    self.archive = archive

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: only tensors, OrderedDict and BytesIO blobs are "
        "allowed in a checkpoint")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return _LazyStorage(self.archive, key, storage_type.dtype)


class _ConcatFile(io.RawIOBase):
  """Read-only, seekable view of byte shards as one file."""

  def __init__(self, paths: list[str]):
    self.paths = paths
    self.sizes = [os.path.getsize(p) for p in paths]
    self.starts = np.cumsum([0] + self.sizes[:-1]).tolist()
    self.total = sum(self.sizes)
    self.pos = 0
    self.files = [open(p, "rb") for p in paths]

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self.pos

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.total}[whence]
    self.pos = max(0, base + offset)
    return self.pos

  def read(self, n=-1):
    if n is None or n < 0:
      n = self.total - self.pos
    out = bytearray()
    while n > 0 and self.pos < self.total:
      i = int(np.searchsorted(self.starts, self.pos, side="right") - 1)
      f, local = self.files[i], self.pos - self.starts[i]
      f.seek(local)
      chunk = f.read(min(n, self.sizes[i] - local))
      out += chunk
      self.pos += len(chunk)
      n -= len(chunk)
    return bytes(out)

  def readinto(self, b):
    data = self.read(len(b))
    b[:len(data)] = data
    return len(data)

  def close(self):
    for f in self.files:
      f.close()
    super().close()

  def memmap(self, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    """A memmap when the bytes lie within one shard, else a copy."""
    nbytes = count * dtype.itemsize
    i = int(np.searchsorted(self.starts, offset, side="right") - 1)
    local = offset - self.starts[i]
    if local + nbytes <= self.sizes[i]:
      if count == 0:
        return np.zeros(0, dtype)
      return np.memmap(self.paths[i], dtype=dtype, mode="r", offset=local, shape=(count,))
    self.seek(offset)
    return np.frombuffer(self.read(nbytes), dtype=dtype)


def shard_paths(path: str) -> list[str]:
  """``path`` itself, or its ``path.partN`` byte shards in order."""
  if os.path.isfile(path):
    return [path]
  parts = glob.glob(glob.escape(path) + ".part*")
  numbered = sorted((int(m.group(1)), p) for p in parts
                    if (m := re.search(r"\.part(\d+)$", p)))
  if not numbered:
    raise FileNotFoundError(f"checkpoint {path!r} not found (nor {path}.part0, .part1 …)")
  idxs = [i for i, _ in numbered]
  if idxs != list(range(len(idxs))):
    raise ValueError(f"checkpoint shards of {path!r} are not numbered 0..N-1: found {idxs}")
  return [p for _, p in numbered]


class _BytesFile(io.BytesIO):
  def memmap(self, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    return np.frombuffer(self.getbuffer(), dtype=dtype, count=count, offset=offset).copy()


class _Archive:
  def __init__(self, path: str, data: bytes | None = None):
    self.file = _ConcatFile(shard_paths(path)) if data is None else _BytesFile(data)
    try:
      self.zip = zipfile.ZipFile(self.file)
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path!r} is not a torch.save zip archive ({e})") from None
    pkls = [n for n in self.zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
      raise ValueError(f"{path!r} holds {len(pkls)} data.pkl entries; expected one")
    self.prefix = pkls[0][: -len("data.pkl")]
    order = self.zip.namelist()
    bo = self.prefix + "byteorder"
    if bo in order and self.zip.read(bo).strip() != b"little":
      raise ValueError(f"{path!r} was saved big-endian; only little-endian is supported")

  def storage(self, key: str, dtype: np.dtype) -> np.ndarray:
    info = self.zip.getinfo(f"{self.prefix}data/{key}")
    count = info.file_size // dtype.itemsize
    if info.compress_type != zipfile.ZIP_STORED:
      return np.frombuffer(self.zip.read(info), dtype=dtype)
    self.file.seek(info.header_offset)
    header = self.file.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return self.file.memmap(start, dtype, count)

  def load(self) -> Any:
    with self.zip.open(self.prefix + "data.pkl") as f:
      return _Unpickler(f, self).load()


def load_state_dict(path: str) -> dict[str, Any]:
  """The checkpoint's top-level dict: name -> numpy array (memory-mapped) or ``BytesBlob``."""
  return _as_dict(_Archive(path).load(), path)


def load_state_dict_from_bytes(data: bytes, name: str = "<bytes>") -> dict[str, Any]:
  """The same for an archive held in memory (e.g. a ``torch.save`` into a BytesIO)."""
  return _as_dict(_Archive(name, data).load(), name)


def _as_dict(obj: Any, path: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  return dict(obj)


def read_extra_state(blob: bytes) -> dict[str, Any] | None:
  """Decode a ``*._extra_state`` blob (``torch.save`` of a dict into a BytesIO) with the
  restricted reader; None when the blob holds no FP8 state."""
  if not blob.startswith(b"PK"):
    return None
  state = load_state_dict_from_bytes(blob)
  return state if "scale_fwd" in state else None
