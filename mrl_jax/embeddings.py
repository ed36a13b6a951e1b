"""Embeddings z of a split on disk: the shard files, their index, reading them back.

numpy only, so that anything (an evaluator, a notebook, a search index builder)
can read what `mrl_jax.restore.embed_split` / `python -m mrl_jax.embed`
wrote. Layout of a split's directory (default
`<workdir>/embeddings/step_<N>/<split>`):

  p000-00000.z.npy        [n, d] float32 / float16 (rows beyond `count` unused)
  p000-00000.labels.npy   [n] int32, or [n, L] uint8 for multi-label data
  p000-00000.ids.npy      [n] the source's example ids
  index-p000.json         the shard list of process 0 (one such file per process)
  index.json              split, step, dim, dtype, num_examples, the shards in order
                          (written last, by process 0: its presence means complete)

A shard is a preallocated `.npy` memory map filled as batches arrive, so
ImageNet train (1.28M × 2048) never sits in host memory. Several processes
write into one directory, so with more than one host it must be on a shared
file system, as the checkpoints are: a bucket (`gs://…`) is one. There
(mrl_jax.paths) a shard is filled in a local temporary file and uploaded when
full, so the local disk holds one shard at a time (`embed.shard_size` bounds
it), and reading loads z into memory instead of memory-mapping it.
"""

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Dict, List

import numpy as np

from mrl_jax import paths
from mrl_jax.errors import MissingFileError

INDEX_FILE = "index.json"


@dataclasses.dataclass
class Embeddings:
  """A split's representations; `z` may be an np.memmap (slice z[:, :m], don't copy it)."""
  z: np.ndarray          # [N, d] float32 or float16
  labels: np.ndarray     # [N] int32, or [N, L] uint8 multi-hot
  ids: np.ndarray        # [N]


def embeddings_dir(workdir: str, step: int, split: str) -> str:
  """Where a run's embeddings of `split` at `step` live by default."""
  return paths.join(workdir, "embeddings", f"step_{step}", split)


def is_complete(directory: str) -> bool:
  return paths.exists(paths.join(directory, INDEX_FILE))


def read_embeddings(directory: str, mmap: bool = True) -> Embeddings:
  """The embeddings of one split directory; z is memory-mapped for a single shard, and
  concatenated into memory (the size of the split) for several; never mapped from a
  bucket (read into memory)."""
  index_path = paths.join(directory, INDEX_FILE)
  if not paths.exists(index_path):
    raise MissingFileError(f"No embeddings in {directory} (no {INDEX_FILE}): write them with "
                           "`python -m mrl_jax.embed --config=... --workdir=... --split=...`.")
  index = paths.read_json(index_path)
  if not index["shards"]:
    raise MissingFileError(f"{index_path} lists no shards; the split was empty.")
  parts = {"z": [], "labels": [], "ids": []}
  for shard in index["shards"]:
    for key in parts:
      path = paths.join(directory, f"{shard['name']}.{key}.npy")
      if mmap and key == "z" and paths.is_local(path):
        array = np.load(path, mmap_mode="r")
      else:
        with paths.open_read(path) as f:
          array = np.load(f)
      parts[key].append(array[:shard["count"]])
  joined = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
  return Embeddings(**joined)


def clear_process_files(out_dir: str, process: int) -> None:
  """Removes `process`'s shards (and, for process 0, the index) of an earlier write, so
  a rewrite never mixes old and new rows."""
  paths.makedirs(out_dir)
  if process == 0 and is_complete(out_dir):
    paths.remove(paths.join(out_dir, INDEX_FILE))
  for name in paths.listdir(out_dir):
    if name.startswith(f"p{process:03d}-"):
      paths.remove(paths.join(out_dir, name))


class ShardWriter:
  """Fills one process's shards: z into preallocated memory maps, labels and ids buffered
  per shard (small), each shard closed as soon as it is full.

  `capacity` is the most rows this process will add (its share of the split);
  `add(rows, host_batch)` takes this process's rows of z (in its local batch
  order) and its host batch ("mask", "label", "id"), and keeps the rows whose
  mask is 1.
  """

  def __init__(self, out_dir: str, process: int, capacity: int, shard_size: int,
               dtype: np.dtype):
    self.out_dir, self.process, self.dtype = out_dir, process, dtype
    self.remaining = capacity
    self.shard_size = shard_size if shard_size > 0 else max(capacity, 1)
    self.shards: List[Dict[str, Any]] = []
    self._z = None
    # A bucket cannot be memory-mapped: a shard fills a local file, uploaded when full.
    self._stage = None if paths.is_local(out_dir) else tempfile.mkdtemp(prefix="mrl_jax_z_")

  def add(self, rows: np.ndarray, host: Dict[str, np.ndarray]) -> None:
    if len(rows) != len(host["mask"]):
      raise RuntimeError(f"Got {len(rows)} local rows for a local batch of "
                         f"{len(host['mask'])}; the batch sharding and the data disagree.")
    keep = host["mask"] == 1
    rows, labels, ids = rows[keep], host["label"][keep], np.asarray(host["id"])[keep]
    while len(rows):
      if self._z is None:
        self._open(rows.shape[1])
      take = min(len(rows), len(self._z) - self._count)
      self._z[self._count:self._count + take] = rows[:take]
      self._labels.append(labels[:take])
      self._ids.append(ids[:take])
      self._count += take
      rows, labels, ids = rows[take:], labels[take:], ids[take:]
      if self._count == len(self._z):
        self._finish()

  def _open(self, dim: int) -> None:
    size = min(self.shard_size, self.remaining)
    if size <= 0:
      raise RuntimeError("More examples than this process's shard of the split holds.")
    self._name = f"p{self.process:03d}-{len(self.shards):05d}"
    self._z = np.lib.format.open_memmap(self._z_file(), mode="w+", dtype=self.dtype,
                                        shape=(size, dim))
    self.remaining -= size
    self._count, self._labels, self._ids = 0, [], []

  def _z_file(self) -> str:
    name = f"{self._name}.z.npy"
    return os.path.join(self._stage, name) if self._stage else paths.join(self.out_dir, name)

  def _finish(self) -> None:
    self._z.flush()
    self._z = None
    if self._stage:
      paths.upload(self._z_file(), paths.join(self.out_dir, f"{self._name}.z.npy"))
      os.remove(self._z_file())
    ids = np.concatenate(self._ids)
    if ids.dtype == object:
      ids = ids.astype(str)
    _save(paths.join(self.out_dir, f"{self._name}.labels.npy"), np.concatenate(self._labels))
    _save(paths.join(self.out_dir, f"{self._name}.ids.npy"), ids)
    self.shards.append({"name": self._name, "count": int(self._count)})

  def close(self) -> None:
    """Finishes a partly filled shard (skipped images leave its last rows unused)."""
    if self._z is not None and self._count:
      self._finish()
    paths.write_json(paths.join(self.out_dir, f"index-p{self.process:03d}.json"),
                     {"shards": self.shards}, indent=None)
    if self._stage:
      self._z = None
      shutil.rmtree(self._stage, ignore_errors=True)  # a never-filled shard's local file
      self._stage = None


def write_index(out_dir: str, num_processes: int, info: Dict[str, Any]) -> None:
  """index.json from every process's shard list (process 0, once all have closed)."""
  shards = []
  for p in range(num_processes):
    shards.extend(paths.read_json(paths.join(out_dir, f"index-p{p:03d}.json"))["shards"])
  dim = (int(_npy_shape(paths.join(out_dir, f"{shards[0]['name']}.z.npy"))[1])
         if shards else 0)
  info = dict(info, dim=dim, num_examples=sum(s["count"] for s in shards), shards=shards)
  paths.write_json(paths.join(out_dir, INDEX_FILE), info)


def _save(path: str, array: np.ndarray) -> None:
  with paths.atomic_open(path, "wb") as f:
    np.save(f, array)


def _npy_shape(path: str):
  """The shape in a .npy header, without reading the array (it may be in a bucket)."""
  with paths.open_read(path) as f:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(f)[0]
