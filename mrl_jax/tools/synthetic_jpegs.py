"""ImageNet-like JPEGs made up on the spot, for the benchmarks: in memory, or as shards.

The images are 400–500 × 330–375 pixels, the size of ImageNet's: smooth colour
fields, blobs with hard edges, texture and sensor-like noise, so that a JPEG codec
spends on them about what it spends on photos (quality 90: ~87 KB each).
`write_shards` stores them in the arrayrecord format (mrl_jax/data/records.py),
which the `arrayrecord` source reads.
"""

import glob
import io
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from array_record.python import array_record_module
from PIL import Image

from mrl_jax.data import records
from mrl_jax.errors import UserError
from mrl_jax.tools import progress_line

SHARD_SIZE = 128  # images per shard, and per task of the processes that make them
_SOURCE_PREFIX = "mrl_jax.tools.synthetic_jpegs"  # the metadata's `source` says who made it


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90
                   ) -> bytes:
  """A JPEG whose statistics resemble a photo: smooth fields, edges, texture, noise."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.empty((height, width, 3), np.float32)
  for c in range(3):
    a, b, phase = rng.uniform(-1, 1, 3)
    image[..., c] = 128 + 80 * np.sin(a * xx / 40 + b * yy / 30 + 6 * phase)
  for _ in range(6):  # objects with hard edges
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    image[inside] = 0.5 * image[inside] + 0.5 * rng.uniform(0, 255, 3)
  texture = rng.normal(0, 1, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
  image += 25 * np.kron(texture, np.ones((4, 4, 1), np.float32))[:height, :width]
  image += rng.normal(0, 12, image.shape).astype(np.float32)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                quality=quality)
  return buffer.getvalue()


def imagenet_like_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
  """One JPEG of an ImageNet-like size, drawn from `rng`."""
  width, height = int(rng.integers(400, 501)), int(rng.integers(330, 376))
  return synthetic_jpeg(rng, width, height, quality)


def generate(num_images: int, quality: int = 90, seed: int = 0) -> List[bytes]:
  """`num_images` ImageNet-like JPEGs, the same ones for the same seed."""
  rng = np.random.default_rng(seed)
  return [imagenet_like_jpeg(rng, quality) for _ in range(num_images)]


def write_shards(data_dir: str, num_images: int, *, num_classes: int, quality: int = 90,
                 seed: int = 0, processes: Optional[int] = None, split: str = "train",
                 stream=sys.stderr) -> Dict[str, Any]:
  """`num_images` ImageNet-like JPEGs as the arrayrecord split `split` of `data_dir`,
  made once: a rerun with the same arguments finds them by their metadata and
  generates nothing. Image i has label i % num_classes and its own random stream,
  so the data does not depend on `processes` (default: every core). Returns a
  summary: where, how many, whether `reused`, and how long generating took."""
  source = (f"{_SOURCE_PREFIX}: {num_images} ImageNet-like JPEGs, quality {quality}, "
            f"seed {seed}, labels i % {num_classes}")
  meta_path = os.path.join(data_dir, f"{split}.json")
  previous = _previous_source(meta_path)
  if previous == source and _shards_complete(data_dir, meta_path):
    meta = records.read_metadata(meta_path)
    return _summary(data_dir, meta, reused=True, seconds=0.0)
  start = time.monotonic()
  num_shards = -(-num_images // SHARD_SIZE)
  processes = min(processes or os.cpu_count() or 1, num_shards)
  os.makedirs(data_dir, exist_ok=True)
  pattern = os.path.join(data_dir, records.shard_glob(glob.escape(split)))
  stale = glob.glob(pattern + ".tmp-*")  # an interrupted run's
  if previous is not None:  # ours, made with other arguments
    stale += glob.glob(pattern)
  elif glob.glob(pattern):  # shards no metadata of ours describes: not ours to replace
    raise UserError(f"{data_dir} holds {split} shards but no {split}.json of generated "
                    "data; give a --data_dir of its own to the generated shards.")
  for path in stale:
    os.remove(path)
  stream.write(f"Generating {num_images} ImageNet-like JPEGs (quality {quality}) into "
               f"{num_shards} shards in {data_dir} with {processes} processes; later runs "
               "reuse them.\n")
  tasks = [(data_dir, split, i, num_shards, i * num_images // num_shards,
            (i + 1) * num_images // num_shards, num_classes, quality, seed)
           for i in range(num_shards)]
  progress = progress_line.Progress(num_images, stream)
  shards = _make(tasks, processes, progress)
  progress.show(final=True)
  meta = records.build_metadata(
      split=split, shards=[shards[i] for i in range(num_shards)], num_classes=num_classes,
      class_names=None, multi_label=False, skipped=[], source=source)
  records.write_json_atomic(meta_path, meta)  # Last: its presence means complete.
  return _summary(data_dir, meta, reused=False, seconds=time.monotonic() - start)


def _previous_source(meta_path: str) -> Optional[str]:
  """The `source` of the split already in `meta_path` if this module made it; None if
  there is none; a UserError if it is someone else's data (it is not overwritten)."""
  if not os.path.exists(meta_path):
    return None
  source = records.read_metadata(meta_path).get("source", "")
  if not source.startswith(_SOURCE_PREFIX):
    raise UserError(f"{meta_path} describes data that was not generated here ({source!r}); "
                    "give a --data_dir of its own to the generated shards.")
  return source


def _shards_complete(data_dir: str, meta_path: str) -> bool:
  meta = records.read_metadata(meta_path)
  try:
    return all(records.count_records(os.path.join(data_dir, s["file"])) == s["num_examples"]
               for s in meta["shards"])
  except records.RecordError:
    return False


def _make(tasks: List[Tuple], processes: int, progress: progress_line.Progress
          ) -> Dict[int, Dict[str, Any]]:
  """Shard index → its stats, the shards written by `processes` processes."""
  shards = {}

  def collect(results):
    for index, stats in results:
      shards[index] = stats
      progress.add(stats["num_examples"], 0)

  if processes <= 1:
    collect(map(_write_shard, tasks))
  else:
    with multiprocessing.get_context("spawn").Pool(processes) as pool:  # no fork of threads
      collect(pool.imap_unordered(_write_shard, tasks))
  return shards


def _write_shard(task: Tuple) -> Tuple[int, Dict[str, Any]]:
  """One shard (a temporary file, renamed when complete): (index, its stats)."""
  data_dir, split, index, num_shards, begin, end, num_classes, quality, seed = task
  path = os.path.join(data_dir, records.shard_name(split, index, num_shards))
  tmp = f"{path}.tmp-{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
  for i in range(begin, end):
    image = imagenet_like_jpeg(np.random.default_rng((seed, i)), quality)
    writer.write(records.encode_record(image, i % num_classes, f"synthetic/{i:07d}"))
  writer.close()
  os.replace(tmp, path)
  return index, {"file": os.path.basename(path), "num_examples": end - begin}


def _summary(data_dir: str, meta: Dict[str, Any], *, reused: bool, seconds: float
             ) -> Dict[str, Any]:
  n = meta["num_examples"]
  size = sum(os.path.getsize(os.path.join(data_dir, s["file"])) for s in meta["shards"])
  return {"dir": data_dir, "num_images": n, "num_shards": meta["num_shards"],
          "mean_record_kb": round(size / max(n, 1) / 1000, 1), "reused": reused,
          "generate_s": round(seconds, 2)}
