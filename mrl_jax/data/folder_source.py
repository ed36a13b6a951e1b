"""An image folder in the ImageNet layout: `{data_dir}/{split}/{class_name}/*.jpg`.

Classes are the sorted subfolder names of the TRAIN split, so every split
agrees on the class ids. Images stay encoded (the pipeline's `decode` op
decodes them and skips corrupt ones). The scan uses `os.scandir` only (no
per-file stat), which keeps a 1.28M-image ImageNet scan to seconds on a
local disk; nothing is cached on disk. The converter
`mrl_jax.tools.build_dataset` uses the same scan, so both see the same examples
in the same order.
"""

import os
from typing import Any, List, Sequence, Tuple

import numpy as np
from absl import logging

from mrl_jax.data import SOURCES
from mrl_jax.errors import ConfigError, MissingFileError

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
    ".pbm", ".pnm"})


def _subdirs(path: str) -> List[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_classes(train_dir: str) -> List[str]:
  """The sorted class folder names of a train split folder."""
  if not os.path.isdir(train_dir):
    raise MissingFileError(f"Train split folder {train_dir} does not exist; the classes "
                           "are its subfolders (layout DIR/train/<class_name>/<images>).")
  classes = _subdirs(train_dir)
  if not classes:
    raise MissingFileError(f"{train_dir} has no class subfolders; expected the layout "
                           f"{train_dir}/<class_name>/<image files>.")
  return classes


def scan_split(data_dir: str, split_name: str,
               class_names: Sequence[str]) -> Tuple[List[str], np.ndarray]:
  """(paths relative to data_dir, int32 labels) of the images of one split.

  Sorted by (class, file name). A class folder unknown to `class_names` is an
  error; an empty class folder is only a warning.
  """
  split_dir = os.path.join(data_dir, split_name)
  if not os.path.isdir(split_dir):
    raise MissingFileError(f"Split folder {split_dir} does not exist; {data_dir} has "
                           f"{_subdirs(data_dir) if os.path.isdir(data_dir) else 'nothing'}.")
  class_ids = {name: i for i, name in enumerate(class_names)}
  present = _subdirs(split_dir)
  unknown = [c for c in present if c not in class_ids]
  if unknown:
    raise ConfigError(
        f"{split_dir} has class folder(s) {unknown[:5]} that the train split does not have "
        f"({len(class_names)} classes, e.g. {list(class_names[:3])}); every split must use "
        "the train split's class folder names.")
  with os.scandir(split_dir) as entries:
    loose = sum(1 for e in entries if not e.is_dir())
  if loose:
    logging.warning("Ignoring %d files directly in %s: images must be in class subfolders.",
                    loose, split_dir)
  paths, labels, empty = [], [], []
  for name in present:
    with os.scandir(os.path.join(split_dir, name)) as entries:
      files = sorted(e.name for e in entries
                     if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
    if not files:
      empty.append(name)
    paths.extend(f"{split_name}/{name}/{f}" for f in files)
    labels.extend([class_ids[name]] * len(files))
  if empty:
    logging.warning("%d class folder(s) of %s have no images: %s", len(empty), split_dir,
                    empty[:10])
  if not paths:
    raise MissingFileError(
        f"No images in {split_dir}: expected {split_dir}/<class_name>/<name>.jpg (extensions "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case).")
  return paths, np.asarray(labels, np.int32)


def split_name_for(input_config: Any, split: str) -> str:
  """The dataset's name of the pipeline split ("train"/"val"), from `input.splits`."""
  # A split the mapping does not name (an extra embed split, say) is its own folder.
  return str(input_config.splits.get(split, split))


@SOURCES.register("folder")
class FolderSource:
  """Encoded images of `{data_dir}/{splits[split]}/{class}/`, labels from folder names."""

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    data_dir = os.path.expanduser(input_config.data_dir)
    if not data_dir or not os.path.isdir(data_dir):
      raise MissingFileError(
          f"Image folder {data_dir!r} does not exist; set --config.input.data_dir to a folder "
          "with one subfolder per split and one per class (DIR/train/<class>/<images>).")
    name = split_name_for(input_config, split)
    if not os.path.isdir(os.path.join(data_dir, name)):
      raise MissingFileError(
          f"Split folder {os.path.join(data_dir, name)} does not exist (the {split!r} split); "
          f"{data_dir} has {_subdirs(data_dir)}. Set --config.input.splits.{split}=<folder>.")
    self.data_dir = data_dir
    self.class_names = list_classes(os.path.join(data_dir, split_name_for(input_config,
                                                                           "train")))
    self.num_classes_in_data = len(self.class_names)
    if self.num_classes_in_data > num_classes:
      raise ConfigError(
          f"{data_dir} has {self.num_classes_in_data} classes but config.num_classes="
          f"{num_classes}; set --config.num_classes={self.num_classes_in_data}.")
    if self.num_classes_in_data < num_classes:
      logging.warning("%s has %d classes; config.num_classes=%d leaves some unused.",
                      data_dir, self.num_classes_in_data, num_classes)
    paths, self.labels = scan_split(data_dir, name, self.class_names)
    # One bytes blob + offsets: 1.28M paths as Python strings would cost ~10x the
    # memory in every grain worker, and pickle slowly.
    encoded = [os.fsencode(p) for p in paths]
    self._blob = b"".join(encoded)
    self._ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
    self.multi_label = bool(input_config.multi_label)
    logging.info("Folder source %s/%s: %d images, %d classes.", data_dir, name, len(paths),
                 self.num_classes_in_data)

  def __len__(self) -> int:
    return len(self.labels)

  def _relpath(self, index: int) -> str:
    start = int(self._ends[index - 1]) if index else 0
    return os.fsdecode(self._blob[start:int(self._ends[index])])

  def describe(self, index: int) -> str:
    return f"file {os.path.join(self.data_dir, self._relpath(index))}"

  def __getitem__(self, index: int):
    relpath = self._relpath(index)
    with open(os.path.join(self.data_dir, relpath), "rb") as f:
      image = f.read()
    label = int(self.labels[index])
    if self.multi_label:
      label = np.asarray([label], np.int32)
    return {"image": image, "label": label, "id": relpath}
