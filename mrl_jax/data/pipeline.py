"""grain pipeline: host shard → shuffle → preprocess → drop bad images → batch → devices.

Each process reads `source[shard_index::shard_count]` (by default
`jax.process_index()::jax.process_count()`) and produces its part of the
global batch; `jax.make_array_from_process_local_data` assembles the global
array over the mesh. Images stay uint8 until they are on the device (4× less
host→device traffic); the step normalises them.

Order of the train pipeline, and why:
- Examples are preprocessed in grain worker processes (`mp_prefetch`), one
  example at a time; batching happens after the prefetch, in the main process
  (grain #1129: batching before `mp_prefetch` lost data with several workers).
- A corrupt image becomes a marker instead of a crash; the main process drops
  markers, counts them and logs the record (`skipped`), so the same examples
  are skipped on every run and the batch stays full.
- Batch-level ops (mixup, cutmix) run last, seeded by the batch counter.
The iterator's position (grain state + skip count) is a small JSON-able dict:
`get_state()` / `set_state()` restore the exact next batch.

Eval iterators are padded to the same number of batches on every process,
with `mask` = 0 on the padding (and on skipped images), so each readable
example is counted exactly once.
"""

import math
import queue
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import grain
import jax
import numpy as np
from absl import flags, logging

from mrl_jax.errors import ConfigError, CorruptImageError, DataError

DEVICE_KEYS = ("image", "label", "mask")
_SKIPPED = "_skipped"  # Key of the marker that replaces an unreadable example.
_LOG_FIRST_SKIPS = 20  # Log every skipped record up to here, then every 100th.


def local_batch_size(global_batch: int, shard_count: Optional[int] = None) -> int:
  count = jax.process_count() if shard_count is None else shard_count
  if global_batch % count:
    raise ConfigError(f"Global batch {global_batch} is not divisible by the {count} "
                      "processes; choose a multiple of the process count.")
  return global_batch // count


def _worker_processes(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
  """`workers` grain processes preprocess examples (none: in this process)."""
  if workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain's workers read absl flags; outside an absl app (a notebook, a test)
    # nothing has parsed them yet, and the defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _shard(shard: Optional[Tuple[int, int]]) -> Tuple[int, int]:
  return (jax.process_index(), jax.process_count()) if shard is None else shard


class _LoadExample:
  """index → preprocessed example with a checked label, or a skip marker.

  Runs in the grain workers. A label the config cannot hold is a `DataError`
  (the dataset or `num_classes` is wrong: skipping would hide it); an image no
  decoder reads is a skip marker (one bad JPEG in 1.28M must not end the run).
  """

  def __init__(self, source, preprocess: Callable, num_classes: int, multi_label: bool):
    self.source, self.preprocess = source, preprocess
    self.num_classes, self.multi_label = num_classes, multi_label

  def __call__(self, index: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
    index = int(index)
    raw = self.source[index]
    label = self._label(raw["label"], index)
    try:
      example = self.preprocess(raw, rng)
    except CorruptImageError as e:
      return {_SKIPPED: f"{self._where(index)}: {e}", "id": raw.get("id", index)}
    return {"image": example["image"], "label": label, "id": raw.get("id", index)}

  def _where(self, index: int) -> str:
    describe = getattr(self.source, "describe", None)
    return describe(index) if describe else f"example {index}"

  def _label(self, label, index: int):
    ids = np.asarray(label)
    if ids.ndim == 1 and not self.multi_label and ids.size != 1:
      raise DataError(f"{self._where(index)} has {ids.size} labels {ids.tolist()[:8]} but "
                      "the config is single-label; set --config.input.multi_label=True "
                      "(and usually --config.mrl.loss=sigmoid).")
    if self.multi_label and ids.ndim == 1 and ids.size == self.num_classes and (
        ids.dtype == np.uint8 or ids.dtype == bool):
      return ids.astype(np.uint8)  # Already multi-hot (the synthetic source).
    ids = ids.reshape(-1).astype(np.int64)
    bad = ids[(ids < 0) | (ids >= self.num_classes)]
    if bad.size:
      raise DataError(f"{self._where(index)} has label {int(bad[0])}, outside [0, "
                      f"{self.num_classes}); set --config.num_classes to the dataset's "
                      "class count, or rebuild the records with the right labels.")
    if not self.multi_label:
      return np.int32(ids[0])
    target = np.zeros((self.num_classes,), np.uint8)
    target[ids] = 1
    return target


class _DropSkipped:
  """Main-process filter: drops skip markers, counts and logs them."""

  def __init__(self):
    self.count = 0

  def __call__(self, example: Dict[str, Any]) -> bool:
    if _SKIPPED not in example:
      return True
    self.count += 1
    if self.count <= _LOG_FIRST_SKIPS or self.count % 100 == 0:
      logging.warning("Skipped unreadable image #%d (id %s): %s", self.count,
                      example["id"], example[_SKIPPED])
    return False


class _BatchOps:
  """Batch-level ops (mixup, cutmix) of the preprocessor; identity when it has none."""

  def __init__(self, preprocess: Callable):
    self.preprocess = preprocess

  def __call__(self, batch: Dict[str, np.ndarray], rng: np.random.Generator):
    return self.preprocess.apply_batch(batch, rng)


class HostIterator:
  """Host-local batches whose position can be saved and restored exactly."""

  def __init__(self, dataset: grain.IterDataset, skips: _DropSkipped):
    self._iterator = iter(dataset)
    self._skips = skips

  def __iter__(self) -> "HostIterator":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return next(self._iterator)

  @property
  def skipped(self) -> int:
    """Unreadable images dropped so far (over the whole run, restored with the state)."""
    return self._skips.count

  def get_state(self) -> Dict[str, Any]:
    return {"grain": self._iterator.get_state(), "skipped": self._skips.count}

  def set_state(self, state: Dict[str, Any]) -> None:
    self._iterator.set_state(state["grain"])
    self._skips.count = int(state.get("skipped", 0))

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close:
      close()


def train_iterator(source, preprocess: Callable, *, global_batch: int, seed: int,
                   num_classes: int, multi_label: bool = False, workers: int = 0,
                   shard: Optional[Tuple[int, int]] = None) -> HostIterator:
  """Endless, shuffled (a new order every epoch) host-local batches.

  `preprocess(example, rng) -> example` makes a uint8 [S, S, 3] image; if it has
  `batch_ops`, its `apply_batch(batch, rng)` runs on every batch. Deterministic
  for a given seed, shard and worker count.
  """
  shard_index, shard_count = _shard(shard)
  local = local_batch_size(global_batch, shard_count)
  indices = grain.MapDataset.range(len(source))[shard_index::shard_count]
  if len(indices) < local:
    raise ConfigError(f"This process's shard has {len(indices)} training examples, fewer "
                      f"than its batch of {local}; lower --config.input.batch_size.")
  ds = (indices.shuffle(seed=seed).repeat()
        .random_map(_LoadExample(source, preprocess, num_classes, multi_label), seed=seed)
        .to_iter_dataset())
  ds = _worker_processes(ds, workers)
  skips = _DropSkipped()
  ds = ds.filter(skips).batch(local, drop_remainder=True)
  if getattr(preprocess, "batch_ops", None):
    ds = ds.random_map(_BatchOps(preprocess), seed=seed + 1)
  return HostIterator(ds, skips)


def eval_iterator(source, preprocess: Callable, *, global_batch: int, num_classes: int,
                  multi_label: bool = False, workers: int = 0,
                  shard: Optional[Tuple[int, int]] = None) -> Iterator[Dict[str, np.ndarray]]:
  """One pass, in order, padded so that every process yields `num_eval_batches`.

  Batches carry `mask` (1: a real, readable example) and `skipped` (1: an
  unreadable image, masked out), so the caller can count and report them.
  """
  shard_index, shard_count = _shard(shard)
  local = local_batch_size(global_batch, shard_count)
  shard_indices = np.arange(shard_index, len(source), shard_count)
  padded = num_eval_batches(len(source), global_batch, shard_count) * local
  ds = grain.MapDataset.range(padded).map(
      _LoadEvalExample(source, preprocess, num_classes, multi_label, shard_indices))
  return iter(_worker_processes(ds.to_iter_dataset(), workers).batch(local))


class _LoadEvalExample:
  """Position in the padded shard → example with `mask` and `skipped`.

  Padding and unreadable images get a blank image of the right shape, made by
  running the preprocessing on a tiny black image, so the batch shape is fixed.
  """

  def __init__(self, source, preprocess, num_classes, multi_label, shard_indices):
    self.load = _LoadExample(source, preprocess, num_classes, multi_label)
    self.shard_indices = shard_indices
    self._blank = None

  def __call__(self, position: int) -> Dict[str, Any]:
    real = position < len(self.shard_indices)
    example = self.load(self.shard_indices[min(position, len(self.shard_indices) - 1)])
    skipped = _SKIPPED in example
    if skipped:
      example = {"image": self._blank_image(), "label": self._blank_label(),
                 "id": example["id"]}
    elif self._blank is None:
      self._blank = example  # Label shape for later blanks.
    return dict(example, mask=np.int32(real and not skipped),
                skipped=np.int32(real and skipped))

  def _blank_image(self) -> np.ndarray:
    black = {"image": np.zeros((2, 2, 3), np.uint8), "label": 0, "id": -1}
    return self.load.preprocess(black, None)["image"]

  def _blank_label(self):
    if not self.load.multi_label:
      return np.int32(0)
    return np.zeros((self.load.num_classes,), np.uint8)


def num_eval_batches(num_examples: int, global_batch: int,
                     shard_count: Optional[int] = None) -> int:
  count = jax.process_count() if shard_count is None else shard_count
  per_process = math.ceil(num_examples / count)
  return math.ceil(per_process / local_batch_size(global_batch, count))


def to_global(batch: Dict[str, np.ndarray], sharding) -> Dict[str, jax.Array]:
  """Host-local numpy batch → global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, batch[k])
          for k in DEVICE_KEYS if k in batch}


class DevicePrefetcher:
  """Moves the next `size` batches to the devices in a background thread, so the
  host→device copy overlaps the step.

  `get_state()` is the host iterator's state after the last batch *handed out*
  (not after the ones already prefetched), so a checkpoint resumes exactly.
  """

  def __init__(self, host_iterator: HostIterator, sharding, size: int = 2):
    self._host = host_iterator
    self._sharding = sharding
    self._queue: "queue.Queue" = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._state = host_iterator.get_state()
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _produce(self):
    try:
      for batch in self._host:
        item = (to_global(batch, self._sharding), self._host.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put(StopIteration())
    except Exception as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def __next__(self) -> Dict[str, jax.Array]:
    item = self._queue.get()
    if isinstance(item, StopIteration):
      self._queue.put(item)  # Stay exhausted.
      raise StopIteration
    if isinstance(item, Exception):
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> Dict[str, Any]:
    return self._state

  @property
  def skipped(self) -> int:
    return int(self._state.get("skipped", 0))

  def close(self) -> None:
    """Stops the thread and the host iterator's worker processes."""
    self._stop.set()
    self._thread.join(timeout=10)
    self._host.close()


def prefetch_to_device(host_iterator: HostIterator, sharding, size: int = 2
                       ) -> DevicePrefetcher:
  return DevicePrefetcher(host_iterator, sharding, size)
