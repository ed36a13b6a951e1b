"""TFDS datasets prepared offline in ArrayRecord format (ImageNet, JFT-style data).

Checks that the prepared data is where the config says before anything is
compiled, and says where it looked and how to fix it. Reading goes through
`tfds.data_source` (random access, no TensorFlow at run time). The full
ImageNet/JFT preprocessing and the converter CLI are the input-pipeline issue's.
"""

import os
from typing import Any

from mrl_jax.data import SOURCES


@SOURCES.register("tfds")
class TfdsSource:
  """`input_config.tfds_name` from `input_config.data_dir`, split mapped by `splits`."""

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    name = input_config.tfds_name
    data_dir = os.path.expanduser(input_config.get("data_dir") or "~/tensorflow_datasets")
    where = os.path.join(data_dir, name.split(":")[0])
    if not os.path.isdir(where):
      raise FileNotFoundError(
          f"Dataset {name!r} was not found: looked in {where}. Prepare it there "
          "(see the README's data section), point to it with "
          "--config.input.data_dir=/path/to/tensorflow_datasets, or run the "
          "':synthetic' variant of this config to train on generated data.")
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("Reading TFDS data needs `pip install tensorflow-datasets` "
                        "(TensorFlow itself is not needed).") from e
    tfds_split = dict(input_config.get("splits", {})).get(split, split)
    self._source = tfds.data_source(name, split=tfds_split, data_dir=data_dir,
                                    download=False)
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    record = self._source[index]
    return {"image": record["image"], "label": record["label"], "id": index}
