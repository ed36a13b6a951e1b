"""grain pipeline: per-host shard → shuffle → preprocess → batch → global jax.Array.

Each process reads `source[process_index::process_count]` and produces its
part of the global batch; `jax.make_array_from_process_local_data` assembles
the global array over the mesh. Images stay uint8 until they are on the
device (4× less host→device traffic); the step normalises them.

Eval iterators are padded to the same number of batches on every process,
with `mask` = 0 on the padding, so each example is counted exactly once.
"""

import math
import queue
import threading
from typing import Any, Dict, Iterator, Optional

import grain
import jax
import numpy as np
from PIL import Image

from mrl_jax.errors import ConfigError

DEVICE_KEYS = ("image", "label", "mask")


class Preprocess:
  """uint8 [h, w, c] → uint8 [size, size, 3]; optional random flip for training."""

  def __init__(self, image_size: int, flip: bool = False):
    self.image_size = image_size
    self.flip = flip

  def __call__(self, example: Dict[str, Any], rng: Optional[np.random.Generator] = None):
    image = np.asarray(example["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if image.shape[:2] != (self.image_size, self.image_size):
      image = np.asarray(Image.fromarray(image).resize(
          (self.image_size, self.image_size), Image.BILINEAR))
    if self.flip and rng is not None and rng.random() < 0.5:
      image = image[:, ::-1]
    return dict(example, image=np.ascontiguousarray(image))


def local_batch_size(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ConfigError(f"Global batch {global_batch} is not divisible by the {count} "
                     "processes; choose a multiple of the process count.")
  return global_batch // count


def train_iterator(source, *, global_batch: int, image_size: int, seed: int,
                   flip: bool = False, workers: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless, shuffled (a new order every epoch) host-local batches."""
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  preprocess = Preprocess(image_size, flip)
  ds = (ds.shuffle(seed=seed).repeat()
        .random_map(preprocess, seed=seed)
        .batch(local_batch_size(global_batch), drop_remainder=True))
  it_ds = ds.to_iter_dataset()
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds)


def eval_iterator(source, *, global_batch: int, image_size: int
                  ) -> Iterator[Dict[str, np.ndarray]]:
  """One pass, in order, padded so that every process yields `num_eval_batches`."""
  shard = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  local = local_batch_size(global_batch)
  padded = num_eval_batches(len(source), global_batch) * local
  preprocess = Preprocess(image_size)

  def example(i):
    ex = preprocess(shard[min(i, len(shard) - 1)])
    return dict(ex, mask=np.int32(i < len(shard)))

  ds = grain.MapDataset.range(padded).map(example).batch(local)
  return iter(ds)


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  per_process = math.ceil(num_examples / jax.process_count())
  return math.ceil(per_process / local_batch_size(global_batch))


def to_global(batch: Dict[str, np.ndarray], sharding) -> Dict[str, jax.Array]:
  """Host-local numpy batch → global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, batch[k])
          for k in DEVICE_KEYS if k in batch}


def prefetch_to_device(iterator: Iterator, sharding, size: int = 2) -> Iterator:
  """Moves the next `size` batches to the devices in a background thread,
  so the host→device copy overlaps the step."""
  buffer: "queue.Queue" = queue.Queue(maxsize=size)
  sentinel = object()

  def produce():
    try:
      for batch in iterator:
        buffer.put(to_global(batch, sharding))
    except Exception as e:  # pylint: disable=broad-except
      buffer.put(e)
    buffer.put(sentinel)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = buffer.get()
    if item is sentinel:
      return
    if isinstance(item, Exception):
      raise item
    yield item
