"""Read a PyTorch ``torch.save`` zip archive without torch, and without executing anything.

A ``.pt`` file is a zip holding ``<prefix>/data.pkl`` (a pickle whose tensors reference
storages by key) and ``<prefix>/data/<key>`` (raw little-endian storage bytes). The restricted
unpickler below knows a fixed allow-list of globals — tensor rebuilding, storage dtypes,
``OrderedDict``, and the ``io.BytesIO`` blobs Transformer Engine stores as ``_extra_state`` — and
refuses everything else. Tensors come back as read-only ``numpy.memmap`` views of the archive
(zip entries are stored uncompressed), so a 40B checkpoint streams instead of loading whole.
Checkpoints cut into byte shards (``X.pt.part0``, ``X.pt.part1`` …) are read as one file.

A downloaded checkpoint is untrusted input. Before anything is allocated or mapped, the reader
refuses (``CheckpointError``, one message naming the file and the entry): compressed entries
(``torch.save`` stores every entry uncompressed; a deflated one can inflate far past the file),
entries whose bytes lie outside the file, storage keys that are not plain names, tensor views
that are not inside their storage (negative or non-integer offsets, sizes or strides; an extent
past the storage's end), and anything the allow-list does not name.
"""

from __future__ import annotations

import collections
import glob
import io
import math
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


class CheckpointError(ValueError):
  """A checkpoint file the reader refuses; the message names the file and the entry."""


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _LazyStorage:
  def __init__(self, archive: "_Archive", key: str, dtype: np.dtype):
    self.archive, self.key, self.dtype = archive, key, dtype

  def array(self) -> np.ndarray:
    return self.archive.storage(self.key, self.dtype)


def _ints(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise CheckpointError(f"tensor {what} {value!r} is not a tuple of integers")
  return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  """A read-only view of ``storage``; refused unless every element it reaches lies inside it."""
  if not isinstance(storage, _LazyStorage):
    raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
  if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
    raise CheckpointError(f"tensor storage offset {offset!r} is not a non-negative integer")
  size, stride = _ints(size, "size"), _ints(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
  if any(s < 0 for s in size) or any(st < 0 for st in stride):
    raise CheckpointError(f"tensor size {size} / stride {stride} has a negative entry")
  n_storage = storage.archive.storage_size(storage.key, storage.dtype)
  if 0 in size:
    needed = offset  # an empty view reaches nothing
  else:
    needed = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
  if needed > n_storage:
    raise CheckpointError(f"tensor of size {size}, stride {stride}, offset {offset} runs past "
                          f"its storage {storage.key!r} ({n_storage} elements)")
  if math.prod(size) > n_storage:  # overlapping (e.g. stride-0) views multiply memory on copy
    raise CheckpointError(f"tensor of size {size}, stride {stride} has more elements than its "
                          f"storage {storage.key!r} ({n_storage}): overlapping views are refused")
  flat = storage.array()
  if not size:
    return flat[offset:offset + 1].reshape(())
  if 0 in size:
    return np.zeros(size, flat.dtype)
  item = flat.dtype.itemsize
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
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
    if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
      raise pickle.UnpicklingError(f"storage key {key!r:.80} is not a plain name")
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
    self.path = path
    self.file = _ConcatFile(shard_paths(path)) if data is None else _BytesFile(data)
    total = self.file.total if data is None else len(data)
    try:
      self.zip = zipfile.ZipFile(self.file)
      infos = self.zip.infolist()
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes is a refusal
      raise CheckpointError(f"{path!r} is not a torch.save zip archive "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    for info in infos:
      if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{path!r}: entry {info.filename!r} is compressed (method {info.compress_type}); "
            "torch.save stores entries uncompressed, and a compressed one can inflate far past "
            "the file's size")
      if info.header_offset + 30 + info.file_size > total or info.file_size != info.compress_size:
        raise CheckpointError(f"{path!r}: entry {info.filename!r} ({info.file_size} bytes) "
                              f"lies outside the file ({total} bytes)")
    pkls = [i.filename for i in infos
            if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pkls) != 1:
      raise CheckpointError(f"{path!r} holds {len(pkls)} data.pkl entries; expected one")
    self.prefix = pkls[0][: -len("data.pkl")]
    self.total = total
    bo = self.prefix + "byteorder"
    try:
      order = self.zip.read(bo).strip() if bo in self.zip.namelist() else b"little"
    except Exception as e:  # noqa: BLE001 - a damaged entry is a refusal
      raise CheckpointError(f"{path!r}: entry {bo!r} is damaged ({type(e).__name__})") from None
    if order != b"little":
      raise CheckpointError(f"{path!r} was saved big-endian; only little-endian is supported")

  def _info(self, key: str) -> zipfile.ZipInfo:
    name = f"{self.prefix}data/{key}"
    try:
      return self.zip.getinfo(name)
    except KeyError:
      raise CheckpointError(f"{self.path!r}: storage entry {name!r} is missing") from None

  def storage_size(self, key: str, dtype: np.dtype) -> int:
    """Elements of storage ``key`` (its entry's bytes must be a whole number of them)."""
    info = self._info(key)
    if info.file_size % dtype.itemsize:
      raise CheckpointError(f"{self.path!r}: storage entry {info.filename!r} holds "
                            f"{info.file_size} bytes, not a multiple of {dtype.name}'s "
                            f"{dtype.itemsize}")
    return info.file_size // dtype.itemsize

  def storage(self, key: str, dtype: np.dtype) -> np.ndarray:
    info = self._info(key)
    count = self.storage_size(key, dtype)
    self.file.seek(info.header_offset)
    header = self.file.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
      raise CheckpointError(f"{self.path!r}: storage entry {info.filename!r} has no local "
                            "header at its offset")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > self.total:
      raise CheckpointError(f"{self.path!r}: storage entry {info.filename!r} runs past the end "
                            f"of the file")
    return self.file.memmap(start, dtype, count)

  def load(self) -> Any:
    name = self.prefix + "data.pkl"
    try:
      with self.zip.open(name) as f:
        return _Unpickler(f, self).load()
    except CheckpointError as e:
      raise CheckpointError(f"{self.path!r}: entry {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes is a refusal
      raise CheckpointError(f"{self.path!r}: entry {name!r} is not a valid state dict pickle "
                            f"({type(e).__name__}: {str(e)[:200]})") from None


def load_state_dict(path: str) -> dict[str, Any]:
  """The checkpoint's top-level dict: name -> numpy array (memory-mapped) or ``BytesBlob``."""
  return _as_dict(_Archive(path).load(), path)


def load_state_dict_from_bytes(data: bytes, name: str = "<bytes>") -> dict[str, Any]:
  """The same for an archive held in memory (e.g. a ``torch.save`` into a BytesIO)."""
  return _as_dict(_Archive(name, data).load(), name)


def _as_dict(obj: Any, path: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  bad = [k for k in obj if not isinstance(k, str)]
  if bad:
    raise CheckpointError(f"{path!r}: key {bad[0]!r:.80} is a {type(bad[0]).__name__}, not a "
                          "parameter name")
  return dict(obj)


def read_extra_state(blob: bytes) -> dict[str, Any] | None:
  """Decode a ``*._extra_state`` blob (``torch.save`` of a dict into a BytesIO) with the
  restricted reader; None when the blob holds no FP8 state."""
  if not blob.startswith(b"PK"):
    return None
  state = load_state_dict_from_bytes(blob)
  return state if "scale_fwd" in state else None
