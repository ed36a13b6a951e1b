"""`<step>/manifest.json`: every file of a checkpoint step with its size and CRC32.

Orbax stores no checksums, so a flipped bit that leaves a file readable would
restore as a silently wrong array. Once a step is complete, process 0 lists its
files here; before a restore they are compared with the list, and a step that
differs is treated like an unreadable one (checkpointing.py sets it aside).

The checksum is zlib's CRC32: it ships with Python, was the fastest measured
here, about twice sha256 and four times md5 on one core (docs/checkpoints.md
has the figures; google-crc32c is not installed), and catches any burst of up
to 32 flipped bits and all but 2^-32 of random damage. It guards against
storage faults, not against deliberate edits. Without checksums
(`checkpoint.verify_checksums=False`, for checkpoints too large to read twice)
the manifest holds sizes only, which catches truncated and missing files at the
cost of a listing.

Paths go through etils.epath, so a step on gs:// works as one on a local disk.
Nothing here knows Orbax: a step is just a directory of files.
"""

import json
import os
import threading
import time
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

from absl import logging
from etils import epath

from mrl_jax import paths

NAME = "manifest.json"
_TMP_PREFIX = f"{NAME}.tmp-"  # paths.atomic_open's temporary file, if a kill left one
_FORMAT = 1
_CHUNK = 1 << 20  # bytes per read: the fastest here (fits the CPU cache; 8+ MiB is slower)


class Mismatch(ValueError):
  """A file of a step is missing, has another size or other bytes than when saved."""

  def __init__(self, file: str, why: str):
    super().__init__(f"{file}: {why}")
    self.file = file


def _files(step_dir: epath.Path) -> List[Tuple[str, epath.Path]]:
  """(path relative to the step, path) of every file but the manifest, sorted."""
  found, top = [], None
  for folder, _, names in step_dir.walk():  # top-down: the first folder is the step's
    top = folder if top is None else top  # as walk spells it (fsspec drops the gs://)
    for name in names:
      rel = (folder / name).relative_to(top).as_posix()
      if rel != NAME and not rel.startswith(_TMP_PREFIX):
        found.append((rel, step_dir / rel))
  return sorted(found, key=lambda x: x[0])


def crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def write(step_dir: epath.Path, *, checksums: bool) -> int:
  """Lists the step's files in its manifest; returns the bytes listed.

  Written atomically (`paths.write_text`), so a process killed meanwhile leaves
  either no manifest or a whole one.
  """
  step_dir = epath.Path(step_dir)
  files = {}
  for rel, path in _files(step_dir):
    entry = {"size": path.stat().length}
    if checksums:
      entry["crc32"] = f"{crc32(path):08x}"
    files[rel] = entry
  text = json.dumps({"format": _FORMAT, "checksum": "crc32" if checksums else None,
                     "files": files}, indent=1, sort_keys=True)
  paths.write_text(step_dir / NAME, text)
  return sum(e["size"] for e in files.values())


def read(step_dir: epath.Path) -> Optional[Dict[str, Dict]]:
  """{relative path: {"size", maybe "crc32"}}, or None for a step without a manifest."""
  path = epath.Path(step_dir) / NAME
  if not path.exists():
    return None
  try:
    return dict(json.loads(path.read_text())["files"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    # Written atomically, so damage here is damage to the step: its files can't be vouched for.
    raise Mismatch(NAME, f"the manifest itself is unreadable ({type(e).__name__}: {e})") from e


def verify(step_dir: epath.Path, *, checksums: bool) -> Optional[int]:
  """The bytes checked once every listed file matches; None if the step has no manifest.

  Raises Mismatch naming the first file that differs. Sizes are checked for all
  files first (a listing), so a truncated or missing file is found before any
  file is read; then, with `checksums`, each file's CRC32.
  """
  step_dir = epath.Path(step_dir)
  files = read(step_dir)
  if files is None:
    return None
  for rel, entry in sorted(files.items()):
    try:
      size = (step_dir / rel).stat().length
    except FileNotFoundError:
      raise Mismatch(rel, "missing (it was listed when the step was saved)") from None
    if size != entry["size"]:
      raise Mismatch(rel, f"{size} bytes on disk, {entry['size']} when saved (truncated "
                          "or overwritten)")
  if checksums:
    for rel, entry in sorted(files.items()):
      if "crc32" not in entry:
        continue
      try:
        got = f"{crc32(step_dir / rel):08x}"
      except OSError as e:
        raise Mismatch(rel, f"unreadable ({e})") from e
      if got != entry["crc32"]:
        raise Mismatch(rel, f"CRC32 {got} on disk, {entry['crc32']} when saved (its bytes "
                            "changed after the save: a storage or transfer fault)")
  return sum(e["size"] for e in files.values())


def check(step_dir: epath.Path, *, checksums: bool) -> Optional[Exception]:
  """None if the step matches its manifest or has none (both logged), else the error:
  a Mismatch, or whatever stopped the check (it never raises, so every process of a
  multi-host run reaches the vote that follows)."""
  start = time.monotonic()
  try:
    nbytes = verify(step_dir, checksums=checksums)
  except Exception as e:  # pylint: disable=broad-except
    return e
  if nbytes is None:
    logging.warning("Checkpoint %s has no %s (saved by an older mrl_jax, or stopped before "
                    "it was written): restoring it unverified.", step_dir, NAME)
  else:
    logging.info("Checkpoint %s matches its manifest (%.1f MB, %s) after %.2f s.", step_dir,
                 nbytes / 1e6, "CRC32s" if checksums else "sizes only",
                 time.monotonic() - start)
  return None


class Writer:
  """Writes the manifests of completed steps in a background thread, on process 0.

  The caller says which steps it saved (`saved`) and, once the save machinery is
  idle, which of them still exist (`start`); `join` must come before anything
  that may delete a step (the next save's cleanup), so no step is read while it
  is removed. A step whose manifest could not be written stays restorable,
  unverified, so a failure here is logged and never stops training.
  """

  def __init__(self, directory: epath.Path, *, checksums: bool, enabled: bool):
    self._directory = epath.Path(directory)
    self._checksums = checksums
    self._enabled = enabled
    self._pending: List[int] = []
    self._thread: Optional[threading.Thread] = None

  @property
  def pending(self) -> bool:
    return bool(self._pending)

  def saved(self, step: int) -> None:
    if self._enabled:
      self._pending.append(int(step))

  def start(self, kept: Iterable[int]) -> None:
    """Writes the pending steps among `kept` (all complete) in the background."""
    if self._thread is not None and self._thread.is_alive():
      return
    kept = set(kept)
    steps, self._pending = [s for s in self._pending if s in kept], []
    if steps:
      self._thread = threading.Thread(target=self._write_all, args=(steps,),
                                      name="mrl_jax_manifest", daemon=False)
      self._thread.start()

  def join(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def flush(self, kept: Iterable[int]) -> None:
    """Writes every pending step among `kept` before returning."""
    self.join()
    kept = set(kept)
    steps, self._pending = [s for s in self._pending if s in kept], []
    self._write_all(steps)

  def _write_all(self, steps: List[int]) -> None:
    for step in steps:
      step_dir = self._directory / str(step)
      start = time.monotonic()
      try:
        if not step_dir.is_dir():  # its save failed; the error is reported by the save
          continue
        nbytes = write(step_dir, checksums=self._checksums)
        logging.info("Wrote %s (%.1f MB%s) in %.2f s.", os.fspath(step_dir / NAME), nbytes / 1e6,
                     ", with CRC32s" if self._checksums else ", sizes only",
                     time.monotonic() - start)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not write %s (%s: %s); that step stays restorable, without "
                        "verification.", os.fspath(step_dir / NAME), type(e).__name__, e)
