"""Data sources (a registry), preprocessing specs and the grain pipeline.

A source is a random-access sequence (len, getitem) of examples
{"image": encoded bytes or uint8 [H, W, C], "label": int or class ids, "id"};
the pipeline does sharding over hosts, shuffling, preprocessing (a spec of
registered ops, `mrl_jax.data.preprocess`) and batching. Sources are built by
name from `config.input.source` with their split ("train" / "val").
"""

from typing import Any

import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.registry import Registry

SOURCES = Registry("data source")


def build_source(input_config: Any, split: str, *, num_classes: int):
  """The source `input_config.source` for `split`, checked to exist; the train split
  reduced to `input_config.train_examples` examples when that is set."""
  _import_all()
  source = SOURCES.get(input_config.source)(input_config, split, num_classes=num_classes)
  limit = int(input_config.train_examples)
  if split == "train" and 0 < limit < len(source):
    source = Subset(source, limit, seed=0)
  return source


class Subset:
  """A fixed random `size`-example subset of a source (index order kept), for shorter
  runs on a big train split; the same subset for every run and process."""

  def __init__(self, source, size: int, *, seed: int):
    self.source = source
    self.indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:size])
    self.class_names = getattr(source, "class_names", None)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def describe(self, index: int) -> str:
    inner = int(self.indices[index])
    describe = getattr(self.source, "describe", None)
    return describe(inner) if describe else f"example {inner}"


def preprocess_spec(input_config: Any, split: str) -> str:
  """`input.pp_train` / `input.pp_eval`, or the default for `image_size` (and `flip`)."""
  spec = input_config.pp_train if split == "train" else input_config.pp_eval
  if spec:
    return spec
  size = input_config.image_size
  return f"decode|resize({size})" + ("|flip_lr" if split == "train" and input_config.flip
                                     else "")


def build_preprocess(input_config: Any, split: str, *, num_classes: int):
  """The parsed spec for `split`, checked to produce `image_size` images."""
  from mrl_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  spec = preprocess_spec(input_config, split)
  preprocessor = preprocess.parse(spec, num_classes=num_classes)
  probe = preprocessor({"image": np.zeros((300, 400, 3), np.uint8), "label": 0, "id": ""},
                       np.random.default_rng(0))["image"]
  size = input_config.image_size
  if probe.shape != (size, size, 3):
    raise ConfigError(f"The {split} preprocessing {spec!r} makes {probe.shape[0]}×"
                      f"{probe.shape[1]} images but config.input.image_size is {size}; make "
                      "them agree (the model is built for image_size).")
  return preprocessor


def normalization(input_config: Any, *, num_classes: int):
  """(mean, std) of the specs' `normalize(...)`, which the device applies; train and
  eval must agree, or the model would be evaluated on differently scaled inputs."""
  train = build_preprocess(input_config, "train", num_classes=num_classes)
  val = build_preprocess(input_config, "val", num_classes=num_classes)
  if (train.mean, train.std) != (val.mean, val.std):
    raise ConfigError(f"Train and eval preprocessing normalise differently "
                      f"({input_config.pp_train!r} vs {input_config.pp_eval!r}); "
                      "use the same normalize(...) in both.")
  return train.mean, train.std


def _import_all():
  # Each module registers its sources on import.
  from mrl_jax.data import (arrayrecord_source, digits, folder_source,  # noqa: F401
                            idx_source, synthetic, tfds_source)
