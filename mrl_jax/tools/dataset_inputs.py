"""What `build_dataset` converts: the sorted example list of a folder, a labels file or TFDS.

Each function returns `Inputs`: the examples (as (path, label) items, or a
TFDS split read in ranges by the workers), class names and class count.
"""

import csv
import dataclasses
import os
from typing import Any, List, Optional, Tuple

from mrl_jax.data import folder_source, records
from mrl_jax.errors import ConfigError, MissingFileError


@dataclasses.dataclass
class Inputs:
  """What to convert: files (`items`: (path relative to input_dir, label)) or TFDS."""
  source: str
  num_examples: int
  items: Optional[List[Tuple[str, Any]]] = None
  tfds: Optional[Tuple[str, str, str]] = None
  class_names: Optional[List[str]] = None
  num_classes: int = 0


def folder_inputs(input_dir: str, split: str, output_dir: str) -> Inputs:
  """The images of INPUT/{split}/; class names from the train split (or OUT/train.json)."""
  train_meta = os.path.join(output_dir, "train.json")
  if split != "train" and os.path.exists(train_meta):
    class_names = records.read_metadata(train_meta).get("class_names")
    if not class_names:
      raise ConfigError(f"{train_meta} has no class names to reuse for split {split!r}.")
  else:
    try:
      class_names = folder_source.list_classes(os.path.join(input_dir, "train"))
    except FileNotFoundError as e:
      if split == "train":
        raise
      raise MissingFileError(f"Split {split!r} takes its class ids from the train split, but "
                             f"there is neither {train_meta} nor a train folder ({e}). Build "
                             "the train split first.") from None
  paths, labels = folder_source.scan_split(input_dir, split, class_names)
  return Inputs(source=f"folder {os.path.realpath(os.path.join(input_dir, split))}",
                num_examples=len(paths), items=list(zip(paths, labels.tolist())),
                class_names=class_names, num_classes=len(class_names))


def labels_file_inputs(labels_file: str, input_dir: str, num_classes: int) -> Inputs:
  """Rows `path,label[,label...]`; a header row starting with `path` is allowed."""
  rows = []
  with open(labels_file, newline="", encoding="utf-8") as f:
    for line, row in enumerate(csv.reader(f), 1):
      if not row or (line == 1 and row[0].strip().lower() == "path"):
        continue
      try:
        labels = [int(x) for x in row[1:] if x.strip()]
      except ValueError:
        raise ConfigError(f"{labels_file}:{line}: labels must be integer class ids, got "
                          f"{row[1:]}.") from None
      if not labels or min(labels) < 0 or (num_classes and max(labels) >= num_classes):
        raise ConfigError(f"{labels_file}:{line}: needs labels in [0, "
                          f"{num_classes or 'num_classes'}), got {row[1:]}.")
      rows.append((row[0].strip(), labels))
  if not rows:
    raise ConfigError(f"{labels_file} lists no images (expected rows path,label[,label...]).")
  rows.sort()
  multi_label = any(len(labels) != 1 for _, labels in rows)
  items = [(p, labels if multi_label else labels[0]) for p, labels in rows]
  return Inputs(source=f"labels_file {os.path.realpath(labels_file)} over {input_dir}",
                num_examples=len(items), items=items, num_classes=num_classes)


def tfds_inputs(name: str, split: str, data_dir: str) -> Inputs:
  from mrl_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  class_names = tfds_source.tfds_class_names(name, data_dir)
  return Inputs(source=f"tfds {name}:{split} in {data_dir}",
                num_examples=tfds_source.tfds_num_examples(name, split, data_dir),
                tfds=(name, split, data_dir), class_names=class_names,
                num_classes=len(class_names) if class_names else 0)
