"""The `tfds` source on TFDS datasets prepared in the test (ArrayRecord, no TensorFlow).

The builders below write real Fashion-MNIST images through TFDS' own writer;
TFDS shuffles records when it prepares a split, so every check finds the
written example through its id and compares label(s) and image bytes with it.
"""

import gzip
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from mrl_jax import data
from mrl_jax.data import tfds_source
from mrl_jax.errors import ConfigError
from tests import cli_runner

FMNIST = "/usr/share/datasets/fashion-mnist"
FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
           "sneaker", "bag", "boot"]
N = 16  # examples written: train = [0, 10), test = [10, 16)


def _fashion_mnist():
  with gzip.open(f"{FMNIST}/train-images-idx3-ubyte.gz") as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:N]
  with gzip.open(f"{FMNIST}/train-labels-idx1-ubyte.gz") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)[:N].astype(int)
  return images, labels


IMAGES, LABELS = _fashion_mnist()


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


PNGS = [_encode(image, "PNG") for image in IMAGES]
JPEGS = [_encode(np.stack([image] * 3, -1), "JPEG") for image in IMAGES]
TAGS = [sorted({int(LABELS[k]), int(LABELS[(k + 1) % N])})[:k % 3] for k in range(N)]
WNIDS = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()


class FmnistTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Grayscale PNGs, a named ClassLabel and ImageNet's `file_name` id."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(names=FASHION),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 10), "test": self._generate_examples(10, N)}

  def _generate_examples(self, start, stop):
    for k in range(start, stop):
      yield k, {"image": PNGS[k], "label": int(LABELS[k]), "file_name": f"img{k}.png"}


class FmnistMulti(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """JFT-style: a variable-length list of classes (some empty) under other names."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "jpeg": tfds.features.Image(encoding_format="jpeg"),
        "tags": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10)),
        "key": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for k in range(N):
      yield k, {"jpeg": JPEGS[k], "tags": TAGS[k], "key": f"k{k}"}


class FakeImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """imagenet2012 5.1.0's layout and features, read back by TFDS' real ImageNet builder."""
  name = "imagenet2012"
  VERSION = tfds.core.Version("5.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(
            names_file=tfds.core.tfds_path("datasets/imagenet2012/labels.txt")),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 10),
            "validation": self._generate_examples(10, N)}

  def _generate_examples(self, start, stop):
    for k in range(start, stop):
      wnid = WNIDS[100 * LABELS[k] + k]
      yield k, {"image": JPEGS[k], "label": wnid, "file_name": f"{wnid}_{k}.JPEG"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  tfds.disable_progress_bar()
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  for builder in (FmnistTiny, FmnistMulti, FakeImagenet):
    builder(data_dir=str(root), file_format="array_record").download_and_prepare(
        download_config=config)
  return root


def _input(data_dir, name="fmnist_tiny", **overrides):
  c = common.get_base_config().input
  c.update(dict(source="tfds", tfds_name=name, data_dir=str(data_dir)))
  c.splits.val = "test"
  c.update(overrides)
  return c


def _written_index(example_id):
  return int(example_id.split(".")[0].split("_")[-1].lstrip("imgk"))


def _assert_is_written_fmnist(source, expected_indices):
  seen = []
  for i in range(len(source)):
    ex = source[i]
    k = _written_index(ex["id"])
    assert ex["id"] == f"img{k}.png"
    assert ex["label"] == LABELS[k]
    assert ex["image"] == PNGS[k]  # the encoded bytes, untouched
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ex["image"]))), IMAGES[k])
    seen.append(k)
  assert sorted(seen) == list(expected_indices)


def test_reads_every_example_with_its_label_id_and_exact_png(data_dir):
  train = data.build_source(_input(data_dir), "train", num_classes=10)
  val = data.build_source(_input(data_dir), "val", num_classes=10)
  assert (len(train), len(val)) == (10, 6)
  _assert_is_written_fmnist(train, range(10))
  _assert_is_written_fmnist(val, range(10, N))
  assert train.class_names == FASHION and train.num_classes_in_data == 10
  assert "fmnist_tiny" in train.describe(3) and "'train'" in train.describe(3)


def test_pickled_source_reopens_its_data(data_dir):
  source = data.build_source(_input(data_dir), "val", num_classes=10)
  _assert_is_written_fmnist(pickle.loads(pickle.dumps(source)), range(10, N))


def test_imagenet2012_layout_reads_through_tfds_imagenet_builder(data_dir):
  # Default splits mapping: val -> "validation", as prepared by `tfds build imagenet2012`.
  cfg = _input(data_dir, "imagenet2012", splits=dict(train="train", val="validation"))
  val = data.build_source(cfg, "val", num_classes=1000)
  assert len(val) == N - 10 and val.class_names == WNIDS
  for i in range(len(val)):
    ex = val[i]
    k = _written_index(ex["id"])
    wnid = WNIDS[100 * LABELS[k] + k]
    assert ex["id"] == f"{wnid}_{k}.JPEG" and ex["label"] == WNIDS.index(wnid)
    assert ex["image"] == JPEGS[k]
    assert Image.open(io.BytesIO(ex["image"])).size == (28, 28)
  with pytest.raises(ConfigError, match=r"1000 classes.*num_classes=10;.*num_classes=1000"):
    data.build_source(cfg, "val", num_classes=10)


def test_multi_label_lists_become_int32_class_id_arrays(data_dir):
  cfg = _input(data_dir, "fmnist_multi", image_key="jpeg", label_key="tags",
               id_key="key", multi_label=True)
  source = data.build_source(cfg, "train", num_classes=10)
  assert len(source) == N
  lengths = set()
  for i in range(N):
    ex = source[i]
    k = int(ex["id"][1:])
    assert ex["label"].dtype == np.int32
    np.testing.assert_array_equal(ex["label"], TAGS[k])
    assert ex["image"] == JPEGS[k]
    lengths.add(len(TAGS[k]))
  assert lengths == {0, 1, 2}
  cfg.multi_label = False
  with pytest.raises(ConfigError, match="multi_label=True"):
    data.build_source(cfg, "train", num_classes=10)


def test_bad_split_or_feature_names_list_what_exists(data_dir):
  with pytest.raises(ConfigError, match=r"no split 'validation'.*\['test', 'train'\]"):
    data.build_source(_input(data_dir, splits=dict(val="validation")), "val", num_classes=10)
  with pytest.raises(ConfigError, match=r"no feature 'labels'.*\['file_name', 'image', 'label'\]"
                                        r".*--config.input.label_key"):
    data.build_source(_input(data_dir, label_key="labels"), "train", num_classes=10)


def test_unprepared_or_tfrecord_data_says_how_to_fix(data_dir, tmp_path):
  (tmp_path / "fmnist_tiny" / "1.0.0").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="No prepared version.*holds: 1.0.0"):
    data.build_source(_input(tmp_path), "train", num_classes=10)
  shutil.rmtree(tmp_path / "fmnist_tiny")
  # Writing real TFRecords needs TensorFlow, so the copy only says it is TFRecord,
  # which is all the format check reads.
  shutil.copytree(data_dir / "fmnist_tiny", tmp_path / "fmnist_tiny")
  info_path = tmp_path / "fmnist_tiny" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(ConfigError, match="tfrecord.*--file_format=array_record"):
    data.build_source(_input(tmp_path), "train", num_classes=10)


def test_converter_helpers(data_dir):
  rows = list(tfds_source.iter_tfds_examples("fmnist_tiny", "train", str(data_dir), 3, 8))
  assert len(rows) == 5
  for image, label, example_id in rows:
    k = _written_index(example_id)
    assert (image, label) == (PNGS[k], LABELS[k]) and isinstance(label, int)
  multi = list(tfds_source.iter_tfds_examples("fmnist_multi", "train", str(data_dir), 0, 99,
                                              image_key="jpeg", label_key="tags", id_key="key"))
  assert sorted(int(i[1:]) for _, _, i in multi) == list(range(N))
  assert all(labels == TAGS[int(i[1:])] and image == JPEGS[int(i[1:])]
             for image, labels, i in multi)
  assert tfds_source.tfds_num_examples("fmnist_tiny", "test", str(data_dir)) == N - 10
  assert tfds_source.tfds_num_examples("fmnist_tiny", "train[:4]", str(data_dir)) == 4
  assert tfds_source.tfds_class_names("fmnist_tiny", str(data_dir)) == FASHION
  assert tfds_source.tfds_class_names("fmnist_multi", str(data_dir), "tags") == [
      str(c) for c in range(10)]
  assert tfds_source.tfds_class_names("fmnist_multi", str(data_dir)) is None


@pytest.mark.e2e
def test_converter_copies_a_tfds_split_into_arrayrecord_shards(data_dir, tmp_path):
  from mrl_jax.data import arrayrecord_source  # noqa: F401  (registers "arrayrecord")
  result = cli_runner.run_module(
      "mrl_jax.tools.build_dataset", "--from_tfds=fmnist_tiny", f"--tfds_data_dir={data_dir}",
      "--split=train", f"--output_dir={tmp_path}", "--num_shards=2", "--workers=1",
      timeout=120)
  assert result.returncode == 0, result.stderr
  c = common.get_base_config().input
  c.update(dict(source="arrayrecord", data_dir=str(tmp_path)))
  converted = data.build_source(c, "train", num_classes=10)
  assert converted.class_names == FASHION
  _assert_is_written_fmnist(converted, range(10))
