"""MNIST-format IDX files, e.g. Debian's Fashion-MNIST: 70,000 real 28×28 images, 10 classes.

`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist:

  train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (60,000)
  t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (10,000)

`config.input.data_dir` points at the folder and `config.input.splits` maps
"train"/"val" to the file prefixes ("train", "t10k"); plain and gzipped files
both work. The whole split is read into memory once (47 MB for 60k images),
so examples are served without decoding; grayscale is repeated to RGB.
"""

import gzip
import os
from typing import Any, List, Optional

import numpy as np

from mrl_jax.data import SOURCES
from mrl_jax.errors import ConfigError, DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _find(data_dir: str, name: str) -> str:
  for path in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")):
    if os.path.exists(path):
      return path
  hint = (" Install Debian's copy with `sudo apt-get install dataset-fashion-mnist` (files in "
          f"{FASHION_MNIST_DIR}), or point --config.input.data_dir at a folder holding the "
          "four IDX files.")
  present = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else None
  raise ConfigError(f"IDX file {name}[.gz] not found in {data_dir!r} "
                    f"({'it holds ' + str(present[:6]) if present is not None else 'no such folder'})."
                    + hint)


def read_idx(path: str, magic: int) -> np.ndarray:
  """The uint8 array of one IDX file, checked against its header."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"Cannot read IDX file {path}: {e}. Re-download or reinstall it.") from e
  if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
    raise DataError(f"{path} is not an IDX file of the expected kind (magic "
                    f"{int.from_bytes(raw[:4], 'big') if len(raw) >= 4 else None}, expected "
                    f"{magic}); check the file names.")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(raw) - offset != int(np.prod(shape)):
    raise DataError(f"{path} is truncated: its header says {shape} ({int(np.prod(shape))} "
                    f"bytes) but it holds {len(raw) - offset}. Re-download or reinstall it.")
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


@SOURCES.register("idx")
class IdxSource:
  """Examples {"image": uint8 [H, W, 3], "label": int32, "id": int64 (index in the file)}."""

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    data_dir = input_config.data_dir or FASHION_MNIST_DIR
    prefix = input_config.splits.get(split)
    if not prefix:
      raise ConfigError(f"config.input.splits has no entry for {split!r}; for IDX files set "
                        f"e.g. --config.input.splits.{split}=t10k.")
    images = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"), _IMAGES_MAGIC)
    labels = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"), _LABELS_MAGIC)
    if len(images) != len(labels):
      raise DataError(f"{data_dir}: {prefix} has {len(images)} images but {len(labels)} "
                      "labels; the IDX files do not belong together.")
    top = int(labels.max()) if len(labels) else -1
    if top >= num_classes:
      raise ConfigError(f"{data_dir}/{prefix} has labels up to {top} but config.num_classes="
                        f"{num_classes}; set --config.num_classes={top + 1}.")
    self.images = images  # [N, H, W] grayscale; RGB per example keeps memory at 1/3.
    self.labels = labels.astype(np.int32)
    self.class_names: Optional[List[str]] = (
        list(FASHION_MNIST_CLASSES) if num_classes == 10 else None)
    self._where = f"{data_dir}/{prefix}"

  def __len__(self) -> int:
    return len(self.labels)

  def describe(self, index: int) -> str:
    return f"{self._where} example {index}"

  def __getitem__(self, index: int):
    image = np.repeat(self.images[index][:, :, None], 3, axis=-1)
    return {"image": image, "label": self.labels[index], "id": np.int64(index)}
