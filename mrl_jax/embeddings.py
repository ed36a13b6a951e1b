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
file system, as the checkpoints are.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List

import numpy as np

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
  return os.path.join(os.path.abspath(workdir), "embeddings", f"step_{step}", split)


def is_complete(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, INDEX_FILE))


def read_embeddings(directory: str, mmap: bool = True) -> Embeddings:
  """The embeddings of one split directory; z is memory-mapped for a single shard, and
  concatenated into memory (the size of the split) for several."""
  index_path = os.path.join(directory, INDEX_FILE)
  if not os.path.exists(index_path):
    raise MissingFileError(f"No embeddings in {directory} (no {INDEX_FILE}): write them with "
                           "`python -m mrl_jax.embed --config=... --workdir=... --split=...`.")
  with open(index_path, encoding="utf-8") as f:
    index = json.load(f)
  if not index["shards"]:
    raise MissingFileError(f"{index_path} lists no shards; the split was empty.")
  parts = {"z": [], "labels": [], "ids": []}
  for shard in index["shards"]:
    for key in parts:
      array = np.load(os.path.join(directory, f"{shard['name']}.{key}.npy"),
                      mmap_mode="r" if mmap and key == "z" else None)
      parts[key].append(array[:shard["count"]])
  joined = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
  return Embeddings(**joined)


def clear_process_files(out_dir: str, process: int) -> None:
  """Removes `process`'s shards (and, for process 0, the index) of an earlier write, so
  a rewrite never mixes old and new rows."""
  os.makedirs(out_dir, exist_ok=True)
  if process == 0 and is_complete(out_dir):
    os.remove(os.path.join(out_dir, INDEX_FILE))
  for name in os.listdir(out_dir):
    if name.startswith(f"p{process:03d}-"):
      os.remove(os.path.join(out_dir, name))


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
    self._z = np.lib.format.open_memmap(os.path.join(self.out_dir, f"{self._name}.z.npy"),
                                        mode="w+", dtype=self.dtype, shape=(size, dim))
    self.remaining -= size
    self._count, self._labels, self._ids = 0, [], []

  def _finish(self) -> None:
    self._z.flush()
    self._z = None
    ids = np.concatenate(self._ids)
    if ids.dtype == object:
      ids = ids.astype(str)
    np.save(os.path.join(self.out_dir, f"{self._name}.labels.npy"),
            np.concatenate(self._labels))
    np.save(os.path.join(self.out_dir, f"{self._name}.ids.npy"), ids)
    self.shards.append({"name": self._name, "count": int(self._count)})

  def close(self) -> None:
    """Finishes a partly filled shard (skipped images leave its last rows unused)."""
    if self._z is not None and self._count:
      self._finish()
    with open(os.path.join(self.out_dir, f"index-p{self.process:03d}.json"), "w",
              encoding="utf-8") as f:
      json.dump({"shards": self.shards}, f)


def write_index(out_dir: str, num_processes: int, info: Dict[str, Any]) -> None:
  """index.json from every process's shard list (process 0, once all have closed)."""
  shards = []
  for p in range(num_processes):
    with open(os.path.join(out_dir, f"index-p{p:03d}.json"), encoding="utf-8") as f:
      shards.extend(json.load(f)["shards"])
  dim = (int(np.load(os.path.join(out_dir, f"{shards[0]['name']}.z.npy"), mmap_mode="r")
             .shape[1]) if shards else 0)
  info = dict(info, dim=dim, num_examples=sum(s["count"] for s in shards), shards=shards)
  with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
