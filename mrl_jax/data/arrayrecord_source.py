"""mrl_jax ArrayRecord shards (see mrl_jax/data/records.py for the format).

`input.splits.<split>` is either a split name, read as the shards listed in
`{data_dir}/{name}.json` (what `python -m mrl_jax.tools.build_dataset` writes),
or a glob pattern (contains `*`), relative to data_dir or absolute, for shards
written by other tools; a pattern reads no metadata and checks each record's
labels as it is read. Images stay encoded; the pipeline decodes them.
"""

import bisect
import glob
import os
from concurrent import futures
from typing import Any, List, Optional

from absl import logging
from array_record.python import array_record_data_source

from mrl_jax.data import SOURCES, records
from mrl_jax.data.folder_source import split_name_for
from mrl_jax.errors import ConfigError, DataError, MissingFileError

BUILD_HINT = ("Build the shards with `python -m mrl_jax.tools.build_dataset --input_dir=... "
              "--output_dir=DATA_DIR --split=NAME`, or set --config.input.data_dir / "
              "--config.input.splits.<split> to where they are.")


def _resolve(data_dir: str, name: str):
  """(shard paths, metadata or None) of split `name`."""
  if "*" in name:
    pattern = name if os.path.isabs(name) else os.path.join(data_dir, name)
    paths = sorted(glob.glob(pattern))
    if not paths:
      raise MissingFileError(f"No files match {pattern}. {BUILD_HINT}")
    return paths, None
  meta_path = os.path.join(data_dir, f"{name}.json")
  if not os.path.exists(meta_path):
    pattern = os.path.join(data_dir, records.shard_glob(name))
    found = glob.glob(pattern)
    if found:
      raise MissingFileError(
          f"Found {len(found)} shards {pattern} but no metadata {meta_path}: the conversion "
          "did not finish. Re-run build_dataset (it resumes), or read the shards as they are "
          f"with --config.input.splits.<split>='{records.shard_glob(name)}'.")
    raise MissingFileError(f"No metadata {meta_path} and no shards {pattern}. {BUILD_HINT}")
  meta = records.read_metadata(meta_path)
  paths = [os.path.join(data_dir, s["file"]) for s in meta["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise MissingFileError(f"{len(missing)} shard(s) listed in {meta_path} are missing, e.g. "
                           f"{missing[0]}. Re-run build_dataset to rebuild them.")
  return paths, meta


@SOURCES.register("arrayrecord")
class ArrayRecordSource:
  """Random access over the records of all shards of one split, in shard order."""

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    data_dir = os.path.expanduser(input_config.data_dir)
    name = split_name_for(input_config, split)
    self.num_classes = num_classes
    self.multi_label = bool(input_config.multi_label)
    self._paths, meta = _resolve(data_dir, name)
    with futures.ThreadPoolExecutor(min(32, len(self._paths))) as pool:
      counts = list(pool.map(records.count_records, self._paths))
    self.class_names: Optional[List[str]] = None
    self.num_classes_in_data: Optional[int] = None
    if meta is not None:
      self._check_metadata(meta, counts, os.path.join(data_dir, f"{name}.json"))
    self._starts = [0]
    for n in counts:
      self._starts.append(self._starts[-1] + n)
    if not self._starts[-1]:
      raise MissingFileError(f"The shards of split {name!r} in {data_dir} hold no records. "
                             f"{BUILD_HINT}")
    # "path[0:n]" tells the data source the count, so it does not open every file again.
    self._source = array_record_data_source.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(self._paths, counts)])
    logging.info("ArrayRecord source %r: %d records in %d shards.", name, len(self),
                 len(self._paths))

  def _check_metadata(self, meta, counts, meta_path: str):
    listed = [s["num_examples"] for s in meta["shards"]]
    if listed != counts:
      bad = next(i for i, (a, b) in enumerate(zip(listed, counts)) if a != b)
      raise DataError(f"{self._paths[bad]} holds {counts[bad]} records but {meta_path} says "
                      f"{listed[bad]}: the metadata is stale. Re-run build_dataset.")
    self.class_names = meta.get("class_names")
    self.num_classes_in_data = int(meta["num_classes"])
    if self.num_classes_in_data > self.num_classes:
      raise ConfigError(f"{meta_path} has {self.num_classes_in_data} classes but "
                        f"config.num_classes={self.num_classes}; set "
                        f"--config.num_classes={self.num_classes_in_data}.")
    if meta["multi_label"] and not self.multi_label:
      raise ConfigError(f"{meta_path} holds multi-label data; set "
                        "--config.input.multi_label=True (and --config.mrl.loss=sigmoid).")

  def __len__(self) -> int:
    return self._starts[-1]

  def _locate(self, index: int):
    shard = bisect.bisect_right(self._starts, index) - 1
    return self._paths[shard], index - self._starts[shard]

  def describe(self, index: int) -> str:
    path, position = self._locate(int(index))
    return f"shard {path}, record {position}"

  def __getitem__(self, index: int):
    raw = self._source[index]
    try:
      record = records.decode_record(raw)
    except records.RecordError as e:
      raise DataError(f"{self.describe(index)} is not a valid mrl_jax record: {e}. "
                      f"{records.REBUILD_HINT}") from None
    try:
      label = records.source_label(record["label"], num_classes=self.num_classes,
                                   multi_label=self.multi_label)
    except DataError as e:
      raise DataError(f"{self.describe(index)} (id {record['id']!r}): {e}") from None
    return {"image": record["image"], "label": label, "id": record["id"]}
