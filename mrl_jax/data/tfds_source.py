"""TFDS datasets prepared offline in ArrayRecord format (ImageNet, JFT-style data).

Reads through the builder's `as_data_source` (what `tfds.data_source(...,
download=False)` does): random access, no TensorFlow at run time. Images come
back still encoded (`tfds.decode.SkipDecoding`), so the pipeline's fast decoder
decodes them. Everything that can be wrong with the prepared data (missing,
wrong format, unknown split, missing feature, more classes than the model's
head) is checked when the source is built, before anything is compiled.

The module-level helpers serve the ArrayRecord converter
(mrl_jax/tools/build_dataset.py), which copies TFDS examples into mrl_jax's
own files.
"""

import dataclasses
import os
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np

from mrl_jax import paths
from mrl_jax.data import SOURCES
from mrl_jax.errors import ConfigError, MissingFileError

# The id feature used when the config names none: ImageNet's (and most TFDS
# image datasets') original file name.
DEFAULT_ID_KEY = "file_name"
_ARRAY_RECORD = "array_record"
_READ_CHUNK = 256

Label = Union[int, List[int]]


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Reading TFDS data needs `pip install tensorflow-datasets` "
                      "(TensorFlow itself is not needed).") from e
  return tfds


def _builder(name: str, data_dir: str):
  """The prepared builder of `name` in `data_dir`; clear errors if it is not usable."""
  where = paths.join(data_dir, name.split(":")[0])  # data_dir may be gs://… (TFDS reads it)
  if not paths.is_dir(where):
    raise MissingFileError(
        f"Dataset {name!r} was not found: looked in {where}. Prepare it there "
        "(see docs/data.md), point to it with "
        "--config.input.data_dir=/path/to/tensorflow_datasets, or run the "
        "':synthetic' variant of this config to train on generated data.")
  tfds = _tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    builder = None
  if builder is None or not builder.is_prepared():
    found = ", ".join(paths.listdir(where)) or "nothing"
    raise MissingFileError(
        f"No prepared version of dataset {name!r} in {where} (it holds: {found}). "
        "Finish preparing it (see docs/data.md), or name a prepared "
        "version with --config.input.tfds_name=NAME:VERSION.")
  formats = {f.value for f in builder.info.available_file_formats()}
  if _ARRAY_RECORD not in formats:
    raise ConfigError(
        f"Dataset {name!r} in {builder.data_dir} is stored as {sorted(formats)}, but "
        "mrl_jax reads ArrayRecord (random access, no TensorFlow). Prepare it again "
        f"with `tfds build {name.split(':')[0]} --data_dir={data_dir} "
        "--file_format=array_record` (docs/data.md has the steps).")
  return builder


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Where one split of a dataset is and which features hold image, label(s) and id."""
  name: str
  data_dir: str
  split: str
  image_key: str = "image"
  label_key: str = "label"
  id_key: Optional[str] = None


class _Reader:
  """Checked, picklable random access to one split; opens the data per process."""

  def __init__(self, spec: _Spec):
    builder = _builder(spec.name, spec.data_dir)
    features = builder.info.features
    tfds = _tfds()
    known = sorted(features.keys())
    id_key = spec.id_key
    if id_key is None and DEFAULT_ID_KEY in features:
      id_key = DEFAULT_ID_KEY
    for role, key in (("image", spec.image_key), ("label", spec.label_key), ("id", id_key)):
      if key is not None and key not in features:
        raise ConfigError(
            f"Dataset {spec.name!r} has no feature {key!r} for the {role}; its features "
            f"are {known}. Set --config.input.{role}_key to one of them.")
    image = features[spec.image_key]
    if not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8:
      raise ConfigError(
          f"Feature {spec.image_key!r} of dataset {spec.name!r} is {image!r}, not an "
          "encoded uint8 tfds.features.Image; set --config.input.image_key to the "
          "image feature.")
    label = features[spec.label_key]
    self.multi_label = isinstance(label, tfds.features.Sequence)
    class_label = label.feature if self.multi_label else label
    if not isinstance(class_label, tfds.features.ClassLabel):
      raise ConfigError(
          f"Feature {spec.label_key!r} of dataset {spec.name!r} is {label!r}; mrl_jax "
          "reads a ClassLabel (one class) or a Sequence of ClassLabel (multi-label). "
          "Set --config.input.label_key to such a feature.")
    self.class_names: List[str] = list(class_label.names)
    self.num_classes_in_data: int = class_label.num_classes
    self.num_examples = _num_examples(builder, spec.name, spec.split)
    self.spec = dataclasses.replace(spec, id_key=id_key)
    self.version_dir = str(builder.data_dir)
    self._source = self._open(builder)

  def _open(self, builder=None):
    builder = builder or _builder(self.spec.name, self.spec.data_dir)
    return builder.as_data_source(
        split=self.spec.split, file_format=_ARRAY_RECORD,
        decoders={self.spec.image_key: _tfds().decode.SkipDecoding()})

  def __getstate__(self):
    # grain's worker processes get a copy without the open files and reopen them.
    return {k: v for k, v in self.__dict__.items() if k != "_source"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = None

  def _data(self):
    if self._source is None:
      self._source = self._open()
    return self._source

  def record(self, index: int) -> dict:
    return self._data()[index]

  def records(self, indices) -> list:
    return self._data().__getitems__(list(indices))

  def unpack(self, record: dict, index: int) -> Tuple[bytes, Union[int, np.ndarray], str]:
    """(encoded image, class id or int32 array of ids, id as str) of one record."""
    labels = record[self.spec.label_key]
    label = np.asarray(labels, np.int32) if self.multi_label else int(labels)
    example_id = record[self.spec.id_key] if self.spec.id_key else index
    if isinstance(example_id, bytes):
      example_id = example_id.decode("utf-8")
    return record[self.spec.image_key], label, str(example_id)


def _num_examples(builder, name: str, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    raise ConfigError(
        f"Dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}. "
        "Map the pipeline's splits to them with e.g. --config.input.splits.val=validation."
    ) from None


def _data_dir(data_dir: Optional[str]) -> str:
  return os.path.expanduser(data_dir or "~/tensorflow_datasets")


@SOURCES.register("tfds")
class TfdsSource:
  """`input.tfds_name` from `input.data_dir`, pipeline split mapped by `input.splits`.

  Examples are {"image": encoded bytes, "label": int (or, for a Sequence of
  ClassLabel, an int32 array of class ids), "id": str}.
  """

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    # A split the mapping does not name is looked up in the dataset under its own name.
    tfds_split = input_config.splits.get(split, split)
    self._reader = _Reader(_Spec(
        name=input_config.tfds_name, data_dir=_data_dir(input_config.data_dir),
        split=tfds_split, image_key=input_config.image_key,
        label_key=input_config.label_key,
        id_key=input_config.id_key or None))  # "" → file_name if present, else the index
    name, reader = input_config.tfds_name, self._reader
    if reader.num_classes_in_data > num_classes:
      raise ConfigError(
          f"Dataset {name!r} has {reader.num_classes_in_data} classes but "
          f"config.num_classes={num_classes}; set "
          f"--config.num_classes={reader.num_classes_in_data}.")
    if reader.multi_label and not input_config.multi_label:
      raise ConfigError(
          f"Feature {reader.spec.label_key!r} of dataset {name!r} holds lists of "
          "classes (multi-label); set --config.input.multi_label=True and "
          "--config.mrl.loss=sigmoid.")
    self.num_classes = num_classes
    self.class_names = reader.class_names
    self.num_classes_in_data = reader.num_classes_in_data

  def __len__(self) -> int:
    return self._reader.num_examples

  def __getitem__(self, index: int):
    index = int(index)
    image, label, example_id = self._reader.unpack(self._reader.record(index), index)
    return {"image": image, "label": label, "id": example_id}

  def describe(self, index: int) -> str:
    """Where example `index` lives, for error messages (reads nothing)."""
    spec = self._reader.spec
    return (f"example {index} of split {spec.split!r} of {spec.name!r} in "
            f"{self._reader.version_dir}")


def iter_tfds_examples(name: str, split: str, data_dir: str, start: int, stop: int, *,
                       image_key: str = "image", label_key: str = "label",
                       id_key: Optional[str] = None) -> Iterator[Tuple[bytes, Label, str]]:
  """(encoded image, class id or list of ids, id) of examples [start, stop) of a split."""
  reader = _Reader(_Spec(name, _data_dir(data_dir), split, image_key, label_key, id_key))
  stop = min(stop, reader.num_examples)
  for chunk_start in range(start, stop, _READ_CHUNK):
    indices = range(chunk_start, min(chunk_start + _READ_CHUNK, stop))
    for index, record in zip(indices, reader.records(indices)):
      image, label, example_id = reader.unpack(record, index)
      yield image, (label.tolist() if reader.multi_label else label), example_id


def tfds_num_examples(name: str, split: str, data_dir: str) -> int:
  """Number of examples of `split` (slices like "train[:1000]" allowed)."""
  return _num_examples(_builder(name, _data_dir(data_dir)), name, split)


def tfds_class_names(name: str, data_dir: str, label_key: str = "label") -> Optional[List[str]]:
  """Class names of the label feature (ClassLabel or Sequence of it); None if it has none."""
  tfds = _tfds()
  features = _builder(name, _data_dir(data_dir)).info.features
  feature = features[label_key] if label_key in features else None
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None
