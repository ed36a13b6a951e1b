"""Converts an image folder or a TFDS dataset into mrl_jax ArrayRecord shards.

  python -m mrl_jax.tools.build_dataset --input_dir=/data/imagenet --split=train \
      --output_dir=/data/imagenet_ar --num_shards=1024 --workers=16
  python -m mrl_jax.tools.build_dataset --input_dir=/data/imagenet --split=val ...
  python -m mrl_jax.tools.build_dataset --input_dir=/data/jft --labels_file=train.csv ...
  python -m mrl_jax.tools.build_dataset --from_tfds=imagenet2012 --tfds_data_dir=... ...

Writes `{output_dir}/{split}-00000-of-01024.array_record`, ... and `{split}.json`
(format: mrl_jax/data/records.py); train with `--config.input.source=arrayrecord
--config.input.data_dir={output_dir}`. Images are stored as their original
bytes, after a cheap check; unreadable ones are skipped and listed in the
metadata. Shard i holds examples [i*n//N, (i+1)*n//N) of the sorted list. A
shard appears under its final name only when complete (with its stats in
`{output_dir}/.shard_stats/`), so a re-run skips finished shards and redoes
the rest; the metadata is written last.
"""

import dataclasses
import glob
import io
import json
import multiprocessing
import os
import queue as queue_lib
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from absl import flags, logging
from array_record.python import array_record_module
from PIL import Image

from mrl_jax import cli
from mrl_jax.data import records
from mrl_jax.errors import ConfigError, MissingFileError
from mrl_jax.tools import dataset_inputs, progress_line

FLAGS = flags.FLAGS
flags.DEFINE_string("input_dir", None, "Image folder: INPUT/{split}/{class_name}/*.jpg.")
flags.DEFINE_string("labels_file", None, "CSV of path,label[,label...] (paths relative to "
                    "--input_dir, integer class ids) instead of class folders; for "
                    "multi-label (JFT-style) data.")
flags.DEFINE_integer("num_classes", 0, "With --labels_file: the class count (0: max label+1).")
flags.DEFINE_string("from_tfds", None, "TFDS dataset name to convert instead of a folder.")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir holding the prepared --from_tfds.")
flags.DEFINE_string("split", "train", "Split to convert; also the name of the output files.")
flags.DEFINE_string("output_dir", None, "Where the shards and metadata go.")
flags.DEFINE_integer("num_shards", None, "Number of output shards.")
flags.DEFINE_integer("workers", os.cpu_count(), "Parallel worker processes.")

STATS_DIR = ".shard_stats"
_queue = None  # A worker's progress queue, set by _init_worker.


@dataclasses.dataclass
class ShardTask:
  index: int
  start: int
  stop: int
  path: str
  source: str
  input_dir: Optional[str]
  items: Optional[List[Tuple[str, Any]]]
  tfds: Optional[Tuple[str, str, str]]


def check_image(data: bytes) -> Optional[str]:
  """None if `data` looks like a complete image, else why not.

  Parsing the header and PIL's verify() (PNG: chunk CRCs) cost ~0.03 ms per
  110 KB JPEG; verify() does not read JPEG data, so a JPEG without its end
  marker (a truncated download) is decoded (~1 ms) to decide.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      is_jpeg = image.format == "JPEG"
      image.verify()
    if is_jpeg and not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
      with Image.open(io.BytesIO(data)) as image:
        image.load()
  except Image.UnidentifiedImageError:
    return "not an image file PIL can read"
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad data.
    return f"{type(e).__name__}: {e}"
  return None


def _examples(task: ShardTask) -> Iterator[Tuple[str, Any, Optional[bytes], Optional[str]]]:
  """(id, label, image bytes or None, why it is unreadable) of a shard's examples."""
  if task.tfds is not None:
    from mrl_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
    for data, label, example_id in tfds_source.iter_tfds_examples(*task.tfds, task.start,
                                                                   task.stop):
      yield example_id, label, data, None
    return
  for relpath, label in task.items:
    try:
      with open(os.path.join(task.input_dir, relpath), "rb") as f:
        yield relpath, label, f.read(), None
    except OSError as e:
      yield relpath, label, None, f"{type(e).__name__}: {e}"


def write_shard(task: ShardTask, report: Callable[[int, int], None]) -> Dict[str, Any]:
  """Writes one shard (tmp file, stats, then rename) and returns its stats."""
  tmp = f"{task.path}.tmp-{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
  stats = {"file": os.path.basename(task.path), "num_examples": 0, "bytes": 0, "skipped": [],
           "range": [task.start, task.stop], "source": task.source, "max_label": -1,
           "multi_label": False}
  done = skipped = 0
  last = time.monotonic()
  for example_id, label, data, reason in _examples(task):
    reason = reason or check_image(data)
    if reason:
      stats["skipped"].append({"path": example_id, "reason": reason})
      skipped += 1
    else:
      writer.write(records.encode_record(data, label, example_id))
      stats["num_examples"] += 1
      stats["bytes"] += len(data)
      is_list = isinstance(label, (list, tuple, np.ndarray))
      stats["multi_label"] |= is_list
      stats["max_label"] = max([stats["max_label"], *map(int, label if is_list else [label])])
    done += 1
    if time.monotonic() - last > 0.5:
      report(done, skipped)
      done = skipped = 0
      last = time.monotonic()
  writer.close()
  report(done, skipped)
  records.write_json_atomic(_stats_path(task.path), stats)
  os.replace(tmp, task.path)
  return stats


def _stats_path(shard_path: str) -> str:
  return os.path.join(os.path.dirname(shard_path), STATS_DIR,
                      os.path.basename(shard_path) + ".json")


def _finished_stats(task: ShardTask) -> Optional[Dict[str, Any]]:
  """The stats of an already complete shard for this very task, else None."""
  stats_path = _stats_path(task.path)
  if not (os.path.exists(task.path) and os.path.exists(stats_path)):
    return None
  with open(stats_path, encoding="utf-8") as f:
    stats = json.load(f)
  if stats.get("range") != [task.start, task.stop] or stats.get("source") != task.source:
    return None
  try:
    return stats if records.count_records(task.path) == stats["num_examples"] else None
  except records.RecordError:
    return None


def _init_worker(progress_queue):
  global _queue  # pylint: disable=global-statement
  _queue = progress_queue


def _write_in_worker(task: ShardTask) -> Dict[str, Any]:
  return write_shard(task, lambda done, skipped: _queue.put((done, skipped)))


def _run(tasks: List[ShardTask], workers: int,
         progress: progress_line.Progress) -> List[Dict[str, Any]]:
  if workers <= 1 or len(tasks) == 1:
    return [write_shard(t, progress.add) for t in tasks]
  context = multiprocessing.get_context("spawn")  # No fork of a threaded parent.
  progress_queue = context.Queue()
  with context.Pool(min(workers, len(tasks)), initializer=_init_worker,
                    initargs=(progress_queue,)) as pool:
    pending = [pool.apply_async(_write_in_worker, (t,)) for t in tasks]
    while not all(r.ready() for r in pending):
      for r in pending:
        if r.ready() and not r.successful():
          r.get()  # Re-raises the worker's error.
      try:
        progress.add(*progress_queue.get(timeout=0.2))
      except queue_lib.Empty:
        progress.show()
    results = [r.get() for r in pending]
  while True:  # Counts still in flight when the last worker returned.
    try:
      progress.add(*progress_queue.get(timeout=0.05))
    except queue_lib.Empty:
      return results


def convert(inputs: dataset_inputs.Inputs, split: str, output_dir: str, num_shards: int,
            workers: int, input_dir: Optional[str] = None) -> Dict[str, Any]:
  """Writes the missing shards of `inputs` and then the metadata; returns a summary."""
  start_time = time.monotonic()
  n = inputs.num_examples
  if num_shards < 1 or num_shards > n:
    raise ConfigError(f"--num_shards={num_shards} must be in [1, {n}] ({n} examples to convert).")
  os.makedirs(os.path.join(output_dir, STATS_DIR), exist_ok=True)
  stale = glob.glob(os.path.join(output_dir, records.shard_glob(glob.escape(split)) + ".tmp-*"))
  stale += glob.glob(os.path.join(output_dir, STATS_DIR, "*.tmp-*"))
  for path in stale:
    os.remove(path)
  if stale:
    logging.info("Removed %d partial files of an interrupted run.", len(stale))
  tasks = []
  for i in range(num_shards):
    a, b = i * n // num_shards, (i + 1) * n // num_shards
    tasks.append(ShardTask(i, a, b, os.path.join(output_dir, records.shard_name(split, i,
                                                                               num_shards)),
                           inputs.source, input_dir,
                           inputs.items[a:b] if inputs.items is not None else None,
                           inputs.tfds))
  finished = {t.index: s for t in tasks if (s := _finished_stats(t)) is not None}
  todo = [t for t in tasks if t.index not in finished]
  if finished:
    logging.info("Skipping %d finished shards.", len(finished))
  others = set(glob.glob(os.path.join(output_dir, records.shard_glob(glob.escape(split)))))
  others -= {t.path for t in tasks}
  if others:
    logging.warning("%d shards of split %r from a build with another --num_shards (e.g. %s) "
                    "are not part of this one; delete them.", len(others), split, min(others))
  progress = progress_line.Progress(sum(t.stop - t.start for t in todo))
  built = _run(todo, workers, progress) if todo else []
  if todo:
    progress.show(final=True)
  stats = {**finished, **{t.index: s for t, s in zip(todo, built)}}
  shards = [stats[i] for i in range(num_shards)]
  skipped = [s for shard in shards for s in shard["skipped"]]
  for s in skipped[:20]:
    logging.warning("Skipped %s: %s", s["path"], s["reason"])
  if len(skipped) > 20:
    logging.warning("... and %d more skipped, listed in the metadata.", len(skipped) - 20)
  max_label = max(s["max_label"] for s in shards)
  meta = records.build_metadata(
      split=split, shards=shards, num_classes=inputs.num_classes or max_label + 1,
      class_names=inputs.class_names, multi_label=any(s["multi_label"] for s in shards),
      skipped=skipped, source=inputs.source)
  records.write_json_atomic(os.path.join(output_dir, f"{split}.json"), meta)
  wall = time.monotonic() - start_time
  return {"split": split, "output_dir": output_dir, "num_examples": meta["num_examples"],
          "num_skipped": len(skipped), "num_shards": num_shards, "shards_built": len(todo),
          "shards_reused": len(finished), "image_bytes": sum(s["bytes"] for s in shards),
          "wall_s": round(wall, 2),
          "img_per_sec": round(sum(t.stop - t.start for t in todo) / wall, 1)}


def _inputs_from_flags() -> Tuple[dataset_inputs.Inputs, Optional[str]]:
  if not FLAGS.output_dir:
    raise ConfigError("Set --output_dir (where the shards go).")
  if FLAGS.from_tfds:
    return dataset_inputs.tfds_inputs(FLAGS.from_tfds, FLAGS.split, FLAGS.tfds_data_dir), None
  if not FLAGS.input_dir:
    raise ConfigError("Set --input_dir (an image folder) or --from_tfds (a TFDS dataset).")
  input_dir = os.path.abspath(FLAGS.input_dir)
  if not os.path.isdir(input_dir):
    raise MissingFileError(f"--input_dir {input_dir} does not exist.")
  output_dir = os.path.realpath(FLAGS.output_dir)
  if os.path.commonpath([output_dir, os.path.realpath(input_dir)]) == os.path.realpath(
      input_dir):
    raise ConfigError(f"--output_dir {output_dir} is inside --input_dir {input_dir}; "
                      "choose an output folder outside the input.")
  if FLAGS.labels_file:
    return (dataset_inputs.labels_file_inputs(FLAGS.labels_file, input_dir, FLAGS.num_classes),
            input_dir)
  return dataset_inputs.folder_inputs(input_dir, FLAGS.split, FLAGS.output_dir), input_dir


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # The progress messages are the point of a CLI.
  if FLAGS.num_shards is None:
    raise ConfigError("Set --num_shards (e.g. ~1000 images per shard).")
  inputs, input_dir = _inputs_from_flags()
  summary = convert(inputs, FLAGS.split, FLAGS.output_dir, FLAGS.num_shards, FLAGS.workers,
                    input_dir)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.run(main)
