"""Data sources and the grain pipeline: real digits, exact coverage, determinism."""

import jax
import numpy as np
import pytest

from configs import common
from mrl_jax import data
from mrl_jax.data import pipeline, preprocess


def _pp(size, flip=False):
  return preprocess.parse(f"decode|resize({size})" + ("|flip_lr" if flip else ""),
                          num_classes=10)


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
  batches = list(pipeline.eval_iterator(
      source, _pp(16), global_batch=64, num_classes=10))
  assert len(batches) == pipeline.num_eval_batches(len(source), 64) == -(-len(source) // 64)
  ids = np.concatenate([b["id"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(np.sort(ids), np.sort(source.ids))
  assert batches[0]["image"].shape == (64, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
  assert batches[-1]["mask"].sum() == len(source) - 64 * (len(batches) - 1)


def test_train_iterator_is_seeded_and_reshuffles_each_epoch():
  source = data.build_source(_input(), "train", num_classes=10)
  take = lambda seed, n: [next(it)["id"] for it in [pipeline.train_iterator(
      source, _pp(8), global_batch=32, seed=seed, num_classes=10)]
                          for _ in range(n)]
  first, again, other = take(0, 3), take(0, 3), take(1, 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  per_epoch = len(source) // 32
  it = pipeline.train_iterator(source, _pp(8), global_batch=32, seed=0,
                               num_classes=10)
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
  batch = next(pipeline.eval_iterator(source, _pp(8), global_batch=16,
                                      num_classes=10))
  arrays = pipeline.to_global(batch, sharding.batch_sharding(mesh))
  assert set(arrays) == {"image", "label", "mask"}
  assert arrays["image"].shape == (16, 8, 8, 3)
  assert len(arrays["image"].addressable_shards) == 8
  assert arrays["image"].addressable_shards[0].data.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(jax.device_get(arrays["label"]), batch["label"])


class _WithCorrupt:
  """Digits where some images are bytes no decoder reads (a JPEG header and junk) and
  some labels are replaced."""

  def __init__(self, base, corrupt=(), labels=None):
    self.base, self.corrupt, self.labels = base, set(corrupt), labels or {}

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    ex = dict(self.base[i])
    if i in self.corrupt:
      ex["image"] = b"\xff\xd8 not a jpeg"
    if i in self.labels:
      ex["label"] = self.labels[i]
    return ex

  def describe(self, i):
    return f"record {i} of the test source"


def test_iterator_state_restores_the_exact_next_batch():
  source = data.build_source(_input(), "train", num_classes=10)
  make = lambda: pipeline.train_iterator(source, _pp(8, flip=True),
                                         global_batch=32, seed=3, num_classes=10)
  it = make()
  for _ in range(50):  # Past the first epoch boundary (1,437 examples / 32).
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["id"], want["id"])
    np.testing.assert_array_equal(got["image"], want["image"])  # same random flips


def test_device_prefetcher_state_is_that_of_the_last_batch_handed_out():
  from mrl_jax import sharding
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
  source = data.build_source(_input(), "train", num_classes=10)
  make = lambda: pipeline.train_iterator(source, _pp(8),
                                         global_batch=16, seed=0, num_classes=10)
  prefetcher = pipeline.prefetch_to_device(make(), sharding.batch_sharding(mesh), size=3)
  for _ in range(4):
    next(prefetcher)
  state = prefetcher.get_state()  # The thread has already read further ahead.
  want = jax.device_get(next(prefetcher)["label"])
  prefetcher.close()
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["label"], want)


def test_two_shards_cover_every_example_once_per_epoch():
  source = data.build_source(_input(), "train", num_classes=10)
  per_shard = len(source) // 2 // 16
  ids = []
  for index in range(2):
    it = pipeline.train_iterator(source, _pp(8), global_batch=32,
                                 seed=0, num_classes=10, shard=(index, 2))
    ids.append(np.concatenate([next(it)["id"] for _ in range(per_shard)]))
  assert set(ids[0]).isdisjoint(ids[1])
  assert len(set(ids[0])) == len(ids[0]) and len(set(ids[1])) == len(ids[1])
  assert len(set(ids[0]) | set(ids[1])) == 2 * per_shard * 16 >= len(source) - 32


def test_corrupt_images_are_skipped_counted_and_never_mislabelled(caplog):
  base = data.build_source(_input(), "train", num_classes=10)
  source = _WithCorrupt(base, corrupt=range(0, 100, 7))
  it = pipeline.train_iterator(source, _pp(8), global_batch=32, seed=0,
                               num_classes=10)
  batches = [next(it) for _ in range(len(base) // 32)]
  seen = np.concatenate([b["id"] for b in batches])
  bad_ids = {int(base.ids[i]) for i in range(0, 100, 7)}
  assert not bad_ids & set(seen.tolist())
  assert it.skipped == len(bad_ids) and all(len(b["id"]) == 32 for b in batches)
  labels = np.concatenate([b["label"] for b in batches])
  by_id = dict(zip(base.ids.tolist(), base.labels.tolist()))
  assert [by_id[i] for i in seen.tolist()] == labels.tolist()
  assert "record 7 of the test source" in caplog.text
  state = it.get_state()
  assert state["skipped"] == len(bad_ids)


def test_eval_masks_corrupt_images_and_reports_them():
  base = data.build_source(_input(), "val", num_classes=10)
  source = _WithCorrupt(base, corrupt={3, 10})
  batches = list(pipeline.eval_iterator(source, _pp(8), global_batch=64,
                                        num_classes=10))
  mask = np.concatenate([b["mask"] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  assert skipped.sum() == 2 and mask.sum() == len(base) - 2
  assert batches[0]["image"].shape == (64, 8, 8, 3) and not batches[0]["image"][3].any()


def test_label_outside_num_classes_names_the_record_and_the_fix():
  base = data.build_source(_input(), "train", num_classes=10)
  it = pipeline.train_iterator(_WithCorrupt(base, labels={5: 12}),
                               _pp(8), global_batch=len(base) - 40,
                               seed=0, num_classes=10)
  with pytest.raises(ValueError, match=r"record 5 of the test source.*label 12.*num_classes"):
    next(it)


def test_label_lists_become_multi_hot_targets():
  base = data.build_source(_input(), "val", num_classes=10)
  source = _WithCorrupt(base, labels={i: np.array([i % 10, (i + 3) % 10])
                                      for i in range(len(base))})
  batch = next(pipeline.eval_iterator(source, _pp(8), global_batch=16,
                                      num_classes=10, multi_label=True))
  assert batch["label"].shape == (16, 10) and batch["label"].dtype == np.uint8
  for row, i in zip(batch["label"], range(16)):
    assert set(np.flatnonzero(row)) == {i % 10, (i + 3) % 10}
  with pytest.raises(ValueError, match="multi_label=True"):
    next(pipeline.eval_iterator(source, _pp(8), global_batch=16,
                                num_classes=10))
