"""A MAD sweep's workdir as one small ``.tar.gz`` that travels between machines, and back.

``pack`` keeps what the results need: every ``<task>/<setting>/<layout>/curves.json``, the
workdir's ``results.json``, and the training state (``state_g*.npz``) of unfinished runs as far
as it fits under ``limit_bytes`` (the runs that trained longest first); a state left out is
named, and its runs restart from epoch 0 after ``unpack``. The data (``data.npz``) is left out:
``load_data`` regenerates it from its seed. ``MANIFEST.json`` lists every item with its
progress.

An archive over ``limit_bytes`` is cut into volumes of at most ``limit_bytes`` each (``parts``
of them at most: ``FILE``, ``FILE.2``, ``FILE.3``, ...), so that a whole group's state (tens of
MiB), which no single file back from a device call can hold, still travels; ``check`` and
``unpack`` are given ``FILE`` and read the volumes found beside it as one stream.

``unpack`` checks the whole archive first (gzip, member names, manifest) and then merges it
into a workdir item by item: an item is taken from the archive only when it is further along
than the workdir's copy (finished beats unfinished, then more resumable epochs), so a device
that kept its workdir between calls keeps its newer state.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time

import numpy as np

from sh2_jax import files

FORMAT = "sh2_jax MAD workdir"
VERSION = 1
MANIFEST = "MANIFEST.json"
ITEM_FILE = re.compile(r"^[^/]+/[^/]+/[^/]+/(curves\.json|state_g\d+\.npz)$")


class ArchiveError(ValueError):
  """A file that is not a readable MAD workdir archive (the message says why)."""


def items(workdir: str) -> list[str]:
  """The ``task/setting/layout`` directories of ``workdir`` that hold a ``curves.json``."""
  out = []
  for root, _, names in os.walk(workdir):
    rel = os.path.relpath(root, workdir)
    if "curves.json" in names and rel.count(os.sep) == 2:
      out.append(rel.replace(os.sep, "/"))
  return sorted(out)


def progress(item_dir: str) -> tuple[bool, int]:
  """(finished, resumable epochs) of one item directory: a finished item counts every run's
  epochs; an unfinished one the epochs its saved states hold (0 without state: it restarts)."""
  with open(os.path.join(item_dir, "curves.json")) as f:
    rec = json.load(f)
  if rec.get("complete"):
    return True, sum(len(r["curve"]) for r in rec["runs"])
  epochs = 0
  for name in os.listdir(item_dir):
    if re.fullmatch(r"state_g\d+\.npz", name):
      with np.load(os.path.join(item_dir, name)) as saved:
        epochs += int(saved["epoch"])
  return False, epochs


def volumes(path: str) -> list[str]:
  """``path`` and the volumes ``path.2``, ``path.3``, ... that follow it without a gap."""
  out = [path]
  while os.path.isfile(f"{path}.{len(out) + 1}"):
    out.append(f"{path}.{len(out) + 1}")
  return out


def pack(workdir: str, path: str, limit_bytes: int, log=print, parts: int = 1) -> dict:
  """Write the archive of ``workdir`` to ``path`` (and, past ``limit_bytes``, to the volumes
  ``path.2`` ... ``path.<parts>``; stale volumes of an earlier, longer archive are removed);
  raises ``ArchiveError`` (``path`` left as it was) when even without training state it is
  over ``limit_bytes``. Returns the manifest."""
  if parts < 1:
    raise ValueError(f"parts {parts} must be at least 1")
  total = limit_bytes * parts
  manifest = {"format": FORMAT, "version": VERSION,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "items": {}}
  states = []  # (epochs, item, file name, bytes) of unfinished runs
  for item in items(workdir):
    d = os.path.join(workdir, item)
    done, epochs = progress(d)
    manifest["items"][item] = {"complete": done, "epochs": epochs, "state": False}
    if not done:
      for name in sorted(os.listdir(d)):
        if re.fullmatch(r"state_g\d+\.npz", name):
          states.append((epochs, item, name, os.path.getsize(os.path.join(d, name))))
  base = [(os.path.join(workdir, i, "curves.json"), f"{i}/curves.json") for i in manifest["items"]]
  if os.path.exists(os.path.join(workdir, "results.json")):
    base.append((os.path.join(workdir, "results.json"), "results.json"))

  def write(tmp):
    _write(tmp, base, manifest)
    size = os.path.getsize(tmp)
    if size > limit_bytes:
      raise ArchiveError(f"the archive of {workdir} is {size / 2**20:.1f} MiB without training "
                         f"state, over the {limit_bytes / 2**20:.1f} MiB limit")
    chosen = []
    for epochs, item, name, nbytes in sorted(states, key=lambda s: (-s[0], s[1], s[2])):
      if size + nbytes <= total:  # float state barely compresses: count it whole
        chosen.append((os.path.join(workdir, item, name), f"{item}/{name}"))
        manifest["items"][item]["state"] = True
        size += nbytes
      else:
        manifest["items"][item]["epochs"] = 0
        log(f"pack: the state of {item} ({nbytes / 2**20:.1f} MiB, {epochs} epochs) does "
            f"not fit under {total / 2**20:.1f} MiB ({parts} volume(s) of "
            f"{limit_bytes / 2**20:.1f}); its runs restart from epoch 0 after unpack")
    if chosen:
      _write(tmp, base + chosen, manifest)
      if os.path.getsize(tmp) > total:  # cannot happen by the count above; keep the limit
        for item in manifest["items"].values():
          item["state"], item["epochs"] = False, item["epochs"] if item["complete"] else 0
        _write(tmp, base, manifest)

  with tempfile.TemporaryDirectory(prefix="mad-pack-") as tmpdir:  # placed whole below
    whole = os.path.join(tmpdir, "whole.tar.gz")
    write(whole)
    with open(whole, "rb") as f:
      chunks = [f.read(limit_bytes) for _ in range(-(-os.path.getsize(whole) // limit_bytes))]
  names = [path] + [f"{path}.{k}" for k in range(2, len(chunks) + 1)]
  files.write_bytes_atomic(dict(zip(names, chunks)))  # a killed call leaves the old set whole
  for stale in volumes(path)[len(names):]:
    os.remove(stale)
  return manifest


def _read(path: str) -> bytes:
  """The archive at ``path``, its volumes joined."""
  if not os.path.isfile(path):
    raise ArchiveError(f"{path!r} does not exist or is not a file")
  parts = []
  for name in volumes(path):
    with open(name, "rb") as f:
      parts.append(f.read())
  return b"".join(parts)


def _write(path: str, members: list[tuple[str, str]], manifest: dict) -> None:
  with tarfile.open(path, "w:gz", compresslevel=9) as tar:
    blob = json.dumps(manifest, indent=1).encode()
    info = tarfile.TarInfo(MANIFEST)
    info.size, info.mtime = len(blob), time.time()
    tar.addfile(info, io.BytesIO(blob))
    for src, name in members:
      try:
        tar.add(src, arcname=name, recursive=False)
      except FileNotFoundError:  # a state its group deleted as it finished, while packing
        pass


def check(path: str) -> dict:
  """Read the whole archive at ``path`` (gzip CRC included) and return its manifest; raises
  ``ArchiveError`` naming what is wrong."""
  blob = _read(path)
  try:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
      members = tar.getmembers()
      for m in members:
        ok = m.isfile() and (m.name in (MANIFEST, "results.json") or ITEM_FILE.match(m.name))
        if not ok or ".." in m.name.split("/"):
          raise ArchiveError(f"{path!r} holds {m.name!r}, which is not part of a MAD workdir")
        tar.extractfile(m).read()
      if MANIFEST not in {m.name for m in members}:
        raise ArchiveError(f"{path!r} has no {MANIFEST}; it was not written by --pack")
      manifest = json.loads(tar.extractfile(MANIFEST).read())
  except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as e:
    n = len(volumes(path))
    hint = (f"; read with the {n - 1} volume(s) beside it" if n > 1 else
            f"; if it is the first volume of a longer archive, {path + '.2'!r} and the rest "
            "belong beside it")
    raise ArchiveError(f"{path!r} is not a readable .tar.gz archive ({e}{hint})") from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ArchiveError(f"{path!r} is not a {FORMAT} archive of version {VERSION}")
  return manifest


def unpack(path: str, workdir: str, log=print) -> dict:
  """Merge the archive at ``path`` (already ``check``ed or not) into ``workdir``; returns
  ``{item: "restored" | "kept"}``."""
  check(path)
  os.makedirs(workdir, exist_ok=True)
  outcome = {}
  with tempfile.TemporaryDirectory(dir=workdir, prefix=".unpack-") as tmp:
    with tarfile.open(fileobj=io.BytesIO(_read(path)), mode="r:gz") as tar:
      tar.extractall(tmp, filter="data")
    for item in items(tmp):
      src, dst = os.path.join(tmp, item), os.path.join(workdir, item)
      if os.path.exists(os.path.join(dst, "curves.json")) and progress(dst) >= progress(src):
        outcome[item] = "kept"
        continue
      if os.path.isdir(dst):
        for name in os.listdir(dst):  # keep nothing of the older copy but its data's folder
          if name == "curves.json" or re.fullmatch(r"state_g\d+\.npz", name):
            os.remove(os.path.join(dst, name))
      os.makedirs(dst, exist_ok=True)
      for name in os.listdir(src):
        shutil.move(os.path.join(src, name), os.path.join(dst, name))
      outcome[item] = "restored"
    results = os.path.join(tmp, "results.json")
    if os.path.exists(results) and not os.path.exists(os.path.join(workdir, "results.json")):
      shutil.move(results, os.path.join(workdir, "results.json"))
  restored = sum(v == "restored" for v in outcome.values())
  log(f"unpack: {restored} of {len(outcome)} items restored from {path} "
      f"({len(outcome) - restored} kept: the workdir's copy is as far along)")
  return outcome
