"""Data sources and the grain pipeline: real digits, exact coverage, determinism."""

import jax
import numpy as np
import pytest

from configs import common
from mrl_jax import data
from mrl_jax.data import pipeline


def _input(source="digits", **overrides):
  c = common.get_base_config().input
  c.source = source
  c.update(overrides)
  return c


def test_digits_split_is_real_disjoint_and_stratified():
  from sklearn.datasets import load_digits
  train = data.build_source(_input(), "train", num_classes=10)
  val = data.build_source(_input(), "val", num_classes=10)
  assert len(train) + len(val) == 1797
  assert set(train.ids).isdisjoint(val.ids)
  assert 0.18 < len(val) / 1797 < 0.22
  assert set(np.unique(val.labels)) == set(range(10))
  digits = load_digits()
  ex = val[5]
  assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.uint8
  assert ex["label"] == digits.target[ex["id"]]  # the label belongs to that very image
  np.testing.assert_allclose(ex["image"][..., 0] / 255 * 16, digits.images[ex["id"]], atol=0.04)


def test_digits_rejects_wrong_class_count():
  with pytest.raises(ValueError, match="--config.num_classes=10"):
    data.build_source(_input(), "train", num_classes=1000)


def test_unknown_source_lists_known_ones():
  with pytest.raises(ValueError, match="digits.*synthetic"):
    data.build_source(_input("imagenet_typo"), "train", num_classes=10)


def test_missing_tfds_data_says_where_it_looked(tmp_path):
  cfg = _input("tfds", tfds_name="jft300m", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as info:
    data.build_source(cfg, "train", num_classes=18291)
  message = str(info.value)
  assert str(tmp_path / "jft300m") in message
  assert "--config.input.data_dir" in message and ":synthetic" in message


def test_eval_iterator_covers_every_example_once_with_padding():
  source = data.build_source(_input(), "val", num_classes=10)
  batches = list(pipeline.eval_iterator(source, global_batch=64, image_size=16))
  assert len(batches) == pipeline.num_eval_batches(len(source), 64) == -(-len(source) // 64)
  ids = np.concatenate([b["id"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(np.sort(ids), np.sort(source.ids))
  assert batches[0]["image"].shape == (64, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
  assert batches[-1]["mask"].sum() == len(source) - 64 * (len(batches) - 1)


def test_train_iterator_is_seeded_and_reshuffles_each_epoch():
  source = data.build_source(_input(), "train", num_classes=10)
  take = lambda seed, n: [next(it)["id"] for it in [pipeline.train_iterator(
      source, global_batch=32, image_size=8, seed=seed)] for _ in range(n)]
  first, again, other = take(0, 3), take(0, 3), take(1, 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  per_epoch = len(source) // 32
  it = pipeline.train_iterator(source, global_batch=32, image_size=8, seed=0)
  epoch1 = np.concatenate([next(it)["id"] for _ in range(per_epoch)])
  assert len(set(epoch1)) == len(epoch1)  # no repeats within an epoch


def test_synthetic_source_is_deterministic_and_learnable_shape():
  cfg = _input("synthetic", image_size=24, synthetic_sizes={"train": 50, "val": 10})
  a = data.build_source(cfg, "train", num_classes=7)
  b = data.build_source(cfg, "train", num_classes=7)
  assert len(a) == 50
  np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
  assert a[3]["image"].shape == (24, 24, 3) and a[3]["label"] == 3
  # Examples of one class share a template: closer to each other than to another class.
  same = np.abs(a[0]["image"].astype(int) - a[7]["image"]).mean()
  other = np.abs(a[0]["image"].astype(int) - a[1]["image"]).mean()
  assert same < other
  multi = data.build_source(_input("synthetic", multi_label=True), "val", num_classes=20)
  target = multi[4]["label"]
  assert target.shape == (20,) and target[4] == 1 and 1 <= target.sum() <= 3


def test_global_batch_is_sharded_over_the_data_axes():
  from mrl_jax import sharding
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  source = data.build_source(_input(), "val", num_classes=10)
  batch = next(pipeline.eval_iterator(source, global_batch=16, image_size=8))
  arrays = pipeline.to_global(batch, sharding.batch_sharding(mesh))
  assert set(arrays) == {"image", "label", "mask"}
  assert arrays["image"].shape == (16, 8, 8, 3)
  assert len(arrays["image"].addressable_shards) == 8
  assert arrays["image"].addressable_shards[0].data.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(jax.device_get(arrays["label"]), batch["label"])
