"""The IDX source on Debian's real Fashion-MNIST files, the train subset, and bad files."""

import gzip
import os

import numpy as np
import pytest

from configs import common
from mrl_jax import data
from mrl_jax.errors import ConfigError, DataError
from tests.fashion_folder import IDX_DIR, load_fashion_mnist

pytestmark = pytest.mark.skipif(not os.path.isdir(IDX_DIR),
                                reason="apt-get install dataset-fashion-mnist")


def _input(**overrides):
  cfg = common.get_base_config().input
  cfg.update(dict(source="idx", splits=dict(train="train", val="t10k")))
  cfg.update(overrides)
  return cfg


def test_idx_source_reads_the_real_files():
  train = data.build_source(_input(), "train", num_classes=10)
  val = data.build_source(_input(), "val", num_classes=10)
  assert (len(train), len(val)) == (60_000, 10_000)
  images, labels = load_fashion_mnist(5, offset=1234)
  for i in range(5):
    ex = train[1234 + i]
    assert ex["image"].shape == (28, 28, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][..., 1], images[i])
    assert ex["label"] == labels[i] and ex["id"] == 1234 + i
  assert train.class_names[0] == "t-shirt/top" and "t10k" in val.describe(3)


def test_train_examples_is_a_fixed_subset_of_the_train_split_only():
  a = data.build_source(_input(train_examples=1000), "train", num_classes=10)
  b = data.build_source(_input(train_examples=1000), "train", num_classes=10)
  full = data.build_source(_input(), "train", num_classes=10)
  assert len(a) == 1000 and list(a.indices) == list(b.indices)
  assert list(a.indices) == sorted(set(a.indices.tolist()))
  assert a[10]["id"] == a.indices[10] and a[10]["label"] == full[int(a.indices[10])]["label"]
  assert len(set(np.asarray([a[i]["label"] for i in range(1000)]))) == 10
  assert len(data.build_source(_input(train_examples=1000), "val", num_classes=10)) == 10_000


def test_missing_and_broken_files_say_what_to_do(tmp_path):
  with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
    data.build_source(_input(data_dir=str(tmp_path / "nowhere")), "train", num_classes=10)
  with pytest.raises(ConfigError, match="num_classes=10"):
    data.build_source(_input(), "val", num_classes=5)
  # A truncated copy of the test images (plain, not gzipped: both are read).
  with gzip.open(os.path.join(IDX_DIR, "t10k-images-idx3-ubyte.gz")) as f:
    raw = f.read()
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:len(raw) // 2])
  with gzip.open(os.path.join(IDX_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(f.read())
  with pytest.raises(DataError, match="truncated"):
    data.build_source(_input(data_dir=str(tmp_path)), "val", num_classes=10)
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[8:])  # wrong header
  with pytest.raises(DataError, match="not an IDX file"):
    data.build_source(_input(data_dir=str(tmp_path)), "val", num_classes=10)
