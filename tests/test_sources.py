"""The `folder` and `arrayrecord` sources on real image files and real ArrayRecord shards."""

import pickle
import shutil

import numpy as np
import pytest
from array_record.python import array_record_module

from configs import common
from fashion_folder import CLASS_NAMES, sorted_label, write_image_folder
from mrl_jax import data
from mrl_jax.data import arrayrecord_source, folder_source, records  # noqa: F401  (register)
from mrl_jax.errors import ConfigError, DataError

VAL_CLASSES = ("bag", "coat", "sandal")  # a subset: val ids must still follow train's list


def _input(source, data_dir, **overrides):
  c = common.get_base_config().input
  c.update(dict(source=source, data_dir=str(data_dir), **overrides))
  return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("fashion")
  labels = write_image_folder(root, "train", 120)
  val_labels = write_image_folder(root, "validation", 60, offset=120)
  for name in set(CLASS_NAMES) - set(VAL_CLASSES):
    shutil.rmtree(root / "validation" / name, ignore_errors=True)  # absent if no image
  val_labels = {p: l for p, l in val_labels.items() if p.split("/")[1] in VAL_CLASSES}
  (root / "train" / "notes.txt").write_text("not an image, and not in a class folder")
  return root, labels, val_labels


def test_folder_labels_ids_and_bytes_come_from_the_files(folder):
  root, labels, _ = folder
  source = data.build_source(_input("folder", root), "train", num_classes=10)
  assert source.class_names == sorted(CLASS_NAMES) and source.num_classes_in_data == 10
  ids = [source[i]["id"] for i in range(len(source))]
  assert sorted(ids) == sorted(labels) and len(ids) == 120
  for i in range(len(source)):
    example = source[i]
    assert example["label"] == sorted_label(labels[example["id"]])
    assert example["image"] == (root / example["id"]).read_bytes()
  assert source.describe(7) == f"file {root}/{ids[7]}"
  restored = pickle.loads(pickle.dumps(source))
  assert restored[7]["image"] == source[7]["image"] and restored[7]["id"] == ids[7]


def test_folder_val_uses_the_train_class_list(folder):
  root, _, val_labels = folder
  source = data.build_source(_input("folder", root, multi_label=True), "val", num_classes=12)
  assert len(source) == len(val_labels) > 0
  for i in range(len(source)):
    example = source[i]
    np.testing.assert_array_equal(example["label"], [sorted_label(val_labels[example["id"]])])
    assert example["label"].dtype == np.int32


def test_folder_errors_name_the_problem_and_fix(folder, tmp_path):
  root, _, _ = folder
  with pytest.raises(ConfigError, match="--config.num_classes=10"):
    data.build_source(_input("folder", root), "train", num_classes=5)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    data.build_source(_input("folder", tmp_path / "nowhere"), "train", num_classes=10)
  with pytest.raises(FileNotFoundError, match=r"--config.input.splits.val="):
    data.build_source(_input("folder", root, splits={"val": "val"}), "val", num_classes=10)
  (tmp_path / "train/cat").mkdir(parents=True)
  shutil.copy(root / next(iter(folder[1])), tmp_path / "train/cat/a.jpg")
  (tmp_path / "validation/zebra").mkdir(parents=True)
  (tmp_path / "validation/cat").mkdir(parents=True)
  with pytest.raises(ConfigError, match="zebra"):
    data.build_source(_input("folder", tmp_path), "val", num_classes=10)
  shutil.rmtree(tmp_path / "validation/zebra")
  with pytest.raises(FileNotFoundError, match="No images in"):
    data.build_source(_input("folder", tmp_path), "val", num_classes=10)


def _write_shard(path, raw_records):
  writer = array_record_module.ArrayRecordWriter(str(path), records.WRITER_OPTIONS)
  for raw in raw_records:
    writer.write(raw)
  writer.close()


def test_glob_pattern_reads_shards_written_by_other_tools(folder, tmp_path):
  root, labels, _ = folder
  paths = sorted(labels)[:25]
  # Multi-label, JFT-style: each image has its class and, for odd ones, class 9 too.
  expected = [[labels[p]] + ([9] if i % 2 else []) for i, p in enumerate(paths)]
  for part, chunk in enumerate((range(0, 10), range(10, 25))):
    _write_shard(tmp_path / f"part-{part}.array_record",
                 [records.encode_record((root / paths[i]).read_bytes(), expected[i], paths[i])
                  for i in chunk])
  for pattern in ("part-*.array_record", str(tmp_path / "part-*.array_record")):
    source = data.build_source(
        _input("arrayrecord", tmp_path, multi_label=True, splits={"train": pattern}),
        "train", num_classes=10)
    assert len(source) == 25 and source.class_names is None
    for i in range(25):
      example = source[i]
      assert example["id"] == paths[i]
      assert example["image"] == (root / paths[i]).read_bytes()
      assert example["label"].dtype == np.int32
      assert example["label"].tolist() == expected[i]
    assert source.describe(12) == f"shard {tmp_path}/part-1.array_record, record 2"
    restored = pickle.loads(pickle.dumps(source))
    assert restored[12]["id"] == paths[12]
    assert restored[12]["label"].tolist() == expected[12]
  with pytest.raises(DataError, match="multi_label=True"):
    single = data.build_source(_input("arrayrecord", tmp_path,
                                      splits={"train": "part-*.array_record"}),
                               "train", num_classes=10)
    _ = single[1]


def test_bad_records_name_the_shard_the_index_and_the_fix(tmp_path):
  good = records.encode_record(b"\xff\xd8 not decoded here", 3, "a")
  _write_shard(tmp_path / "s-0.array_record",
               [good, b"\x93junk\x00\xff\xfe", records.encode_record(b"x", 12, "big-label")])
  source = data.build_source(
      _input("arrayrecord", tmp_path, splits={"train": "s-*.array_record"}), "train",
      num_classes=10)
  assert source[0] == {"image": b"\xff\xd8 not decoded here", "label": 3, "id": "a"}
  shard = str(tmp_path / "s-0.array_record")
  with pytest.raises(DataError) as info:
    _ = source[1]
  assert f"shard {shard}, record 1" in str(info.value) and "build_dataset" in str(info.value)
  with pytest.raises(DataError) as info:
    _ = source[2]
  message = str(info.value)
  assert f"{shard}, record 2" in message and "big-label" in message
  assert "label 12 is outside [0, 10)" in message and "--config.num_classes" in message
  (tmp_path / "s-1.array_record").write_bytes(b"written by something else" * 100)
  with pytest.raises(DataError, match=f"{tmp_path}/s-1.array_record is not a readable"):
    data.build_source(_input("arrayrecord", tmp_path, splits={"train": "s-*.array_record"}),
                      "train", num_classes=10)


def test_metadata_is_checked_at_construction(tmp_path):
  _write_shard(tmp_path / records.shard_name("train", 0, 1),
               [records.encode_record(b"img", 15, "x")])
  meta = records.build_metadata(
      split="train", shards=[{"file": records.shard_name("train", 0, 1), "num_examples": 1}],
      num_classes=20, class_names=None, multi_label=False, skipped=[], source="test")
  records.write_json_atomic(str(tmp_path / "train.json"), meta)
  with pytest.raises(ConfigError, match="--config.num_classes=20"):
    data.build_source(_input("arrayrecord", tmp_path), "train", num_classes=10)
  assert data.build_source(_input("arrayrecord", tmp_path), "train",
                           num_classes=20)[0]["label"] == 15
  meta["shards"][0]["num_examples"] = 2
  records.write_json_atomic(str(tmp_path / "train.json"), meta)
  with pytest.raises(DataError, match="stale"):
    data.build_source(_input("arrayrecord", tmp_path), "train", num_classes=20)
  with pytest.raises(FileNotFoundError) as info:
    data.build_source(_input("arrayrecord", tmp_path), "val", num_classes=20)
  assert "validation-?????-of-?????.array_record" in str(info.value)
  assert "python -m mrl_jax.tools.build_dataset" in str(info.value)
