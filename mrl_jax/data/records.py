"""The mrl_jax ArrayRecord format: one msgpack record per image, one JSON file per split.

`python -m mrl_jax.tools.build_dataset` writes it and the `arrayrecord` source
reads it; users with their own tooling (JFT-style data) can write it directly
with `encode_record` and an ArrayRecord writer (options `WRITER_OPTIONS`).

Record: a msgpack map (bin type for bytes, str type for text)
  {"image": bytes,              # the ORIGINAL encoded file (JPEG, PNG, ...), not re-encoded
   "label": int | list[int],    # class id in [0, num_classes); a list for multi-label data
   "id": str}                   # e.g. the path relative to the input dir, or the TFDS id

Shards of split NAME: `NAME-00000-of-00016.array_record`, ... in one directory,
the examples in order (shard i holds the i-th contiguous chunk of the sorted list).

Metadata `NAME.json` next to the shards, written last (its presence means the
split is complete):
  {"format": "mrl_jax.arrayrecord/1", "split": NAME, "num_examples": int,
   "num_shards": int, "shards": [{"file": basename, "num_examples": int}, ...],
   "num_classes": int, "class_names": [str, ...] | null, "multi_label": bool,
   "skipped": [{"path": str, "reason": str}, ...],   # inputs left out, and why
   "source": str,                                      # what the data was built from
   "created": ISO-8601 UTC time}
"""

import datetime
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import msgpack
import numpy as np
from array_record.python import array_record_module

from mrl_jax.errors import DataError

FORMAT = "mrl_jax.arrayrecord/1"
# Random access needs group_size 1; images are compressed already.
WRITER_OPTIONS = "group_size:1,uncompressed"
REBUILD_HINT = ("Rebuild the data with `python -m mrl_jax.tools.build_dataset` or write "
                "records with mrl_jax.data.records.encode_record.")

Label = Union[int, List[int]]


class RecordError(DataError):
  """A record or metadata file that is not in the mrl_jax format (the message says why)."""


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def shard_glob(split: str) -> str:
  return f"{split}-?????-of-?????.array_record"


def count_records(path: str) -> int:
  """The number of records of an ArrayRecord file (reads its footer only)."""
  count, reason = -1, "it cannot be opened"
  try:
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records() if reader.ok() else -1
    reader.close()  # A reader that is not ok() raises why here.
  except (RuntimeError, ValueError, OSError) as e:
    count, reason = -1, str(e)
  if count < 0:
    raise RecordError(f"{path} is not a readable ArrayRecord file ({reason}). {REBUILD_HINT}")
  return count


def encode_record(image: bytes, label: Label, example_id: str) -> bytes:
  """The msgpack bytes of one example, checked so that readers never see a bad one."""
  record = {"image": image, "label": label, "id": example_id}
  _check_record(record)
  if not isinstance(label, (int, np.integer)):
    record["label"] = [int(x) for x in label]
  else:
    record["label"] = int(label)
  return msgpack.packb(record, use_bin_type=True)


def decode_record(raw: bytes) -> Dict[str, Any]:
  """{"image": bytes, "label": int | list[int], "id": str}; RecordError if malformed."""
  try:
    record = msgpack.unpackb(raw, raw=False)
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    raise RecordError(f"not msgpack ({type(e).__name__}: {e})") from None
  _check_record(record)
  return record


def _check_record(record: Any):
  if not isinstance(record, dict):
    raise RecordError(f"a msgpack {type(record).__name__}, not a map")
  missing = {"image", "label", "id"} - set(record)
  if missing:
    raise RecordError(f"missing key(s) {sorted(missing)}; has {sorted(map(str, record))}")
  if not isinstance(record["image"], bytes):
    raise RecordError(f"'image' is {type(record['image']).__name__}, not bytes")
  if not isinstance(record["id"], str):
    raise RecordError(f"'id' is {type(record['id']).__name__}, not str")
  label = record["label"]
  if isinstance(label, bool) or not (
      isinstance(label, (int, np.integer)) or
      (isinstance(label, (list, tuple, np.ndarray)) and
       all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in label))):
    raise RecordError(f"'label' is {label!r}, not an int or a list of ints")


def source_label(label: Label, *, num_classes: int, multi_label: bool):
  """The label as sources return it: int, or int32 class ids for multi-label data.

  Raises DataError (naming the fix) for a label the config cannot train on.
  """
  if isinstance(label, (list, tuple, np.ndarray)):
    if not multi_label:
      raise DataError(f"the label is a list {list(label)} (multi-label data) but the config "
                      "is single-label; set --config.input.multi_label=True.")
    ids = np.asarray(label, np.int64).reshape(-1)
  else:
    ids = np.asarray([label], np.int64)
  bad = ids[(ids < 0) | (ids >= num_classes)]
  if bad.size:
    raise DataError(f"label {int(bad[0])} is outside [0, {num_classes}); set "
                    "--config.num_classes to the data's class count, or rebuild the data.")
  return ids.astype(np.int32) if multi_label else int(ids[0])


def build_metadata(*, split: str, shards: Sequence[Dict[str, Any]], num_classes: int,
                   class_names: Optional[Sequence[str]], multi_label: bool,
                   skipped: Sequence[Dict[str, str]], source: str) -> Dict[str, Any]:
  return {
      "format": FORMAT, "split": split,
      "num_examples": sum(s["num_examples"] for s in shards), "num_shards": len(shards),
      "shards": [{"file": s["file"], "num_examples": s["num_examples"]} for s in shards],
      "num_classes": num_classes,
      "class_names": list(class_names) if class_names is not None else None,
      "multi_label": multi_label, "skipped": list(skipped), "source": source,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def write_json_atomic(path: str, obj: Any):
  """Readers see the old file or the complete new one, never a partial one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_metadata(path: str) -> Dict[str, Any]:
  """The metadata at `path`, checked for the fields readers rely on."""
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise RecordError(f"Metadata {path} is not valid JSON ({e}). {REBUILD_HINT}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise RecordError(f"Metadata {path} has format {found!r}, expected {FORMAT!r}. "
                      f"{REBUILD_HINT}")
  missing = {"shards", "num_classes", "multi_label"} - set(meta)
  if missing:
    raise RecordError(f"Metadata {path} lacks {sorted(missing)}. {REBUILD_HINT}")
  return meta
