"""grain pipeline: host shard → shuffle → preprocess → drop bad images → batch → devices.

Each process reads `source[shard_index::shard_count]` (by default
`jax.process_index()::jax.process_count()`) and produces its part of the
global batch; `jax.make_array_from_process_local_data` assembles the global
array over the mesh. Images stay uint8 until they are on the device (4× less
host→device traffic); the step normalises them.

Order of the train pipeline, and why:
- Whole batches are made in grain worker processes (`mp_prefetch` after
  `MapDataset.batch`): one hand-over per batch, not per example, so the main
  process (which also feeds the accelerator) is not the bottleneck, and
  batches are cut from the global order, so no worker drops a remainder
  (grain #1129 lost data batching per worker after the prefetch).
- A corrupt image is skipped: its slot goes to the next readable record (with
  that record's own label), so batches stay full and the position stays
  exactly restorable. The batch carries the count and a note naming the
  record; the main process logs it and counts it (`skipped`).
- Batch-level ops (mixup, cutmix) run in the workers too, seeded per batch.
The iterator's position (grain state + skip count) is a small JSON-able dict:
`get_state()` / `set_state()` restore the exact next batch.

Eval iterators are padded to the same number of batches on every process,
with `mask` = 0 on the padding (and on skipped images), so each readable
example is counted exactly once.
"""

import copy
import math
import os
import queue
import signal
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import grain
import jax
import numpy as np
from absl import flags, logging

from mrl_jax.errors import ConfigError, CorruptImageError, DataError

DEVICE_KEYS = ("image", "label", "mask")
_LOG_FIRST_SKIPS = 20  # Log every skipped record up to here, then every 100th.
_MAX_UNREADABLE_IN_A_ROW = 64  # More than this many in a row: the data is broken.


def local_batch_size(global_batch: int, shard_count: Optional[int] = None) -> int:
  count = jax.process_count() if shard_count is None else shard_count
  if global_batch % count:
    raise ConfigError(f"Global batch {global_batch} is not divisible by the {count} "
                      "processes; choose a multiple of the process count.")
  return global_batch // count


def _parallel(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
  """Reads the batches of `ds` in `workers` grain processes (0: threads here).

  Elements are whole batches, so read-ahead is counted in batches: grain's
  default (500 elements per process) would hold gigabytes of images.
  """
  if workers <= 0:
    threads = min(os.cpu_count() or 1, 8)  # decode and resize release the GIL
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=threads))
  if not flags.FLAGS.is_parsed():
    # grain's workers read absl flags; outside an absl app (a notebook, a test)
    # nothing has parsed them yet, and the defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """In a grain worker: SIGTERM/SIGINT sent to the whole process group (a scheduler,
  Ctrl-C) are the main process's to handle (it saves a checkpoint, then stops the
  workers); a worker dying first would only delay that save."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shard(shard: Optional[Tuple[int, int]]) -> Tuple[int, int]:
  return (jax.process_index(), jax.process_count()) if shard is None else shard


class _LoadExample:
  """Source index → preprocessed example with a checked label.

  Runs in the grain workers. A label the config cannot hold is a `DataError`
  (the dataset or `num_classes` is wrong: skipping would hide it). An image no
  decoder reads is skipped (one bad JPEG in 1.28M must not end a run): the
  next readable record takes its place, and the example records `skipped` and
  a note naming the unreadable record. (`load` is the single-record step.)
  """

  def __init__(self, source, preprocess: Callable, num_classes: int, multi_label: bool):
    self.source, self.preprocess = source, preprocess
    self.num_classes, self.multi_label = num_classes, multi_label

  def __call__(self, index: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
    notes = []
    for attempt in range(_MAX_UNREADABLE_IN_A_ROW + 1):
      position = (int(index) + attempt) % len(self.source)
      example, note = self.load(position, rng)
      if example is not None:
        return dict(example, skipped=np.int32(len(notes)), skip_notes=notes)
      notes.append(note)
    raise DataError(f"{len(notes)} records in a row from {self._where(int(index))} are "
                    f"unreadable images (the last: {notes[-1]}); the data is broken: check "
                    "or rebuild it.")

  def load(self, position: int, rng) -> Tuple[Optional[Dict[str, Any]], str]:
    """(example, "") or, for an unreadable image, (None, a note naming the record)."""
    raw = self.source[position]
    label = self._label(raw["label"], position)
    example_id = raw.get("id", position)
    try:
      image = self.preprocess(raw, rng)["image"]
    except CorruptImageError as e:
      return None, f"{self._where(position)} (id {example_id}): {e}"
    return {"image": image, "label": label, "id": example_id}, ""

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


def _stack(examples) -> Dict[str, Any]:
  """grain batch_fn: stacks the arrays; the skip notes become one flat str array."""
  notes = [note for example in examples for note in example["skip_notes"]]
  batch = {key: np.stack([example[key] for example in examples])
           for key in examples[0] if key != "skip_notes"}
  batch["skip_notes"] = np.asarray(notes, dtype=str)
  return batch


class _BatchOps:
  """Batch-level ops (mixup, cutmix) of the preprocessor; identity when it has none."""

  def __init__(self, preprocess: Callable):
    self.preprocess = preprocess

  def __call__(self, batch: Dict[str, np.ndarray], rng: np.random.Generator):
    return self.preprocess.apply_batch(batch, rng)


class HostIterator:
  """Host-local batches whose position can be saved and restored exactly.

  Logs the records whose images were skipped and counts them; the count is part
  of the state, so it survives a resume.
  """

  def __init__(self, dataset: grain.IterDataset):
    self._iterator = iter(dataset)
    self.skipped = 0  # Unreadable images skipped so far, over the whole run.

  def __iter__(self) -> "HostIterator":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator)
    for note in batch.pop("skip_notes"):
      self.skipped += 1
      if self.skipped <= _LOG_FIRST_SKIPS or self.skipped % 100 == 0:
        logging.warning("Skipped unreadable image #%d: %s", self.skipped, note)
    return batch

  def get_state(self) -> Dict[str, Any]:
    return {"grain": self._iterator.get_state(), "skipped": self.skipped}

  def set_state(self, state: Dict[str, Any]) -> None:
    self._iterator.set_state(state["grain"])
    self.skipped = int(state.get("skipped", 0))

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
        .batch(local, drop_remainder=True, batch_fn=_stack))
  if getattr(preprocess, "batch_ops", None):
    ds = ds.random_map(_BatchOps(preprocess), seed=seed + 1)
  return HostIterator(_parallel(ds, workers))


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
  return iter(_parallel(ds.batch(local, batch_fn=_stack), workers))


class _LoadEvalExample:
  """Position in the padded shard → example with `mask` and `skipped`.

  Padding and unreadable images get a blank image of the right shape, made by
  running the preprocessing on a tiny black image, so the batch shape is fixed.
  """

  def __init__(self, source, preprocess, num_classes, multi_label, shard_indices):
    self.load = _LoadExample(source, preprocess, num_classes, multi_label)
    self.shard_indices = shard_indices

  def __call__(self, position: int) -> Dict[str, Any]:
    real = position < len(self.shard_indices)
    index = self.shard_indices[min(position, len(self.shard_indices) - 1)]
    example, note = self.load.load(int(index), None)
    if example is None:
      example = {"image": self._blank_image(), "label": self._blank_label(),
                 "id": self.load.source[int(index)].get("id", int(index))}
    skipped = real and bool(note)
    return dict(example, mask=np.int32(real and not note), skipped=np.int32(skipped),
                skip_notes=[note] if skipped else [])

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
        # A copy: the state must not change as the iterator reads further ahead.
        item = (to_global(batch, self._sharding), copy.deepcopy(self._host.get_state()))
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
