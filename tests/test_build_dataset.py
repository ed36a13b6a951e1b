"""The converter CLI as a real subprocess on real Fashion-MNIST image files."""

import json
import os

import pytest

from configs import common
from fashion_folder import CLASS_NAMES, sorted_label, write_image_folder
from mrl_jax import data
from mrl_jax.data import arrayrecord_source  # noqa: F401  (registers "arrayrecord")
from mrl_jax.errors import ConfigError
from tests import cli_runner

pytestmark = pytest.mark.e2e  # every test uses the converter's output (`built`, `_convert`)
BAD = {"train/coat/corrupt.jpg", "train/bag/truncated.jpg"}


def _convert(*args):
  return cli_runner.run_module("mrl_jax.tools.build_dataset", *args, timeout=120)


def _shards(out):
  return {n: open(os.path.join(out, n), "rb").read()
          for n in sorted(os.listdir(out)) if n.endswith(".array_record")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """240 train + 50 val images, plus one corrupt and one truncated train file."""
  root = tmp_path_factory.mktemp("fashion")
  labels = write_image_folder(root, "train", 240)
  val_labels = write_image_folder(root, "val", 50, offset=240)
  (root / "train/coat/corrupt.jpg").write_bytes(b"this is not an image" * 20)
  whole = (root / "train/bag").glob("*.jpg").__next__().read_bytes()
  (root / "train/bag/truncated.jpg").write_bytes(whole[:len(whole) // 2])
  return root, labels, val_labels


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
  root, _, _ = folder
  out = tmp_path_factory.mktemp("built")
  result = _convert(f"--input_dir={root}", f"--output_dir={out}", "--split=train",
                    "--num_shards=4", "--workers=2")
  assert result.returncode == 0, result.stderr
  return out, result


def _source(out, split="train", **overrides):
  c = common.get_base_config().input
  c.update(dict(source="arrayrecord", data_dir=str(out)), **overrides)
  return data.build_source(c, split, num_classes=10)


def test_every_example_round_trips_exactly(folder, built):
  root, labels, _ = folder
  out, result = built
  source = _source(out)
  assert len(source) == 240
  ids = [source[i]["id"] for i in range(len(source))]
  assert set(ids) == set(labels)
  # Sorted by (class folder, file name), as the converter promises.
  assert ids == sorted(labels, key=lambda p: (p.split("/")[1], p.split("/")[2]))
  for i, example_id in enumerate(ids):
    example = source[i]
    assert example["label"] == sorted_label(labels[example_id])
    assert example["image"] == (root / example_id).read_bytes()
  meta = json.loads((out / "train.json").read_text())
  assert meta["class_names"] == sorted(CLASS_NAMES) == source.class_names
  assert meta["num_examples"] == 240 and meta["num_classes"] == 10
  assert {s["path"] for s in meta["skipped"]} == BAD
  # Shard i holds the i-th contiguous quarter of all 242 files, minus the bad ones.
  everything = sorted([*labels, *BAD], key=lambda p: (p.split("/")[1], p.split("/")[2]))
  chunks = [everything[i * 242 // 4:(i + 1) * 242 // 4] for i in range(4)]
  assert [s["num_examples"] for s in meta["shards"]] == [
      len(set(c) - BAD) for c in chunks]
  assert source.describe(0) == f"shard {out}/train-00000-of-00004.array_record, record 0"
  summary = json.loads(result.stdout)
  assert summary["num_examples"] == 240 and summary["num_skipped"] == 2
  assert summary["image_bytes"] == sum((root / p).stat().st_size for p in labels)
  assert "truncated.jpg" in result.stderr  # skipped files are logged, not silently dropped


def test_val_split_reuses_the_train_classes(folder, built):
  root, _, val_labels = folder
  out, _ = built
  result = _convert(f"--input_dir={root}", f"--output_dir={out}", "--split=val",
                    "--num_shards=2", "--workers=1")
  assert result.returncode == 0, result.stderr
  source = _source(out, "val", splits={"train": "train", "val": "val"})
  assert len(source) == 50
  for i in range(len(source)):
    example = source[i]
    assert example["label"] == sorted_label(val_labels[example["id"]])


def test_rerun_skips_finished_shards_and_rebuilds_missing_ones(folder, tmp_path):
  root, _, _ = folder
  args = (f"--input_dir={root}", f"--output_dir={tmp_path}", "--num_shards=4", "--workers=2")
  assert _convert(*args).returncode == 0
  first = _shards(tmp_path)
  mtimes = {n: os.stat(tmp_path / n).st_mtime_ns for n in first}
  again = _convert(*args)
  assert "Skipping 4 finished shards" in again.stderr
  assert _shards(tmp_path) == first
  assert {n: os.stat(tmp_path / n).st_mtime_ns for n in first} == mtimes
  (tmp_path / "train-00002-of-00004.array_record").unlink()
  partial = tmp_path / "train-00001-of-00004.array_record.tmp-4242"
  partial.write_bytes(b"half a shard")
  rebuilt = _convert(*args)
  assert rebuilt.returncode == 0, rebuilt.stderr
  assert "Skipping 3 finished shards" in rebuilt.stderr
  assert not partial.exists()
  assert _shards(tmp_path) == first
  for name in first:
    if name != "train-00002-of-00004.array_record":
      assert os.stat(tmp_path / name).st_mtime_ns == mtimes[name]


def test_labels_file_gives_multi_label_records(folder, tmp_path):
  root, labels, _ = folder
  rows = sorted(labels)[:30]
  # Every image gets its own class plus (for every 3rd) class (label + 1) % 10.
  expected = {p: [labels[p]] + ([(labels[p] + 1) % 10] if i % 3 == 0 else [])
              for i, p in enumerate(rows)}
  csv = tmp_path / "labels.csv"
  csv.write_text("path,labels\n" + "".join(
      f"{p},{','.join(map(str, expected[p]))}\n" for p in rows))
  out = tmp_path / "out"
  result = _convert(f"--input_dir={root}", f"--labels_file={csv}", f"--output_dir={out}",
                    "--num_shards=2", "--workers=1", "--num_classes=10")
  assert result.returncode == 0, result.stderr
  meta = json.loads((out / "train.json").read_text())
  assert meta["multi_label"] and meta["num_classes"] == 10 and meta["num_examples"] == 30
  with pytest.raises(ConfigError, match="multi_label=True"):
    _source(out)
  source = _source(out, multi_label=True)
  got = {source[i]["id"]: source[i]["label"].tolist() for i in range(len(source))}
  assert got == expected


@pytest.mark.parametrize("case", ["missing", "empty", "zero_shards", "too_many_shards",
                                  "inside"])
def test_bad_input_is_one_clear_error(case, folder, tmp_path):
  root, _, _ = folder
  (tmp_path / "empty/train/cat").mkdir(parents=True)
  input_dir, output_dir, shards = root, tmp_path / "out", 4
  if case == "missing":
    input_dir = tmp_path / "nowhere"
  elif case == "empty":
    input_dir = tmp_path / "empty"
  elif case == "zero_shards":
    shards = 0
  elif case == "too_many_shards":
    shards = 1000
  elif case == "inside":
    output_dir = root / "shards"
  result = _convert(f"--input_dir={input_dir}", f"--output_dir={output_dir}",
                    f"--num_shards={shards}", "--workers=1")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("error: ")
  expected = {"missing": str(input_dir), "empty": "No images in",
              "zero_shards": "--num_shards=0", "too_many_shards": "[1, 242]",
              "inside": "inside --input_dir"}[case]
  assert expected in message


def test_records_flow_through_grain_workers_into_global_batches(folder, built):
  """Folder → ArrayRecord → grain (2 worker processes) → global batch on 8 devices."""
  import io

  import jax
  import numpy as np
  from PIL import Image

  from mrl_jax import sharding
  from mrl_jax.data import pipeline, preprocess
  root, labels, _ = folder
  out, _ = built
  source = _source(out)
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
  spec = preprocess.parse("decode|resize(28)", num_classes=10)
  host = pipeline.train_iterator(source, spec, global_batch=48, seed=0, num_classes=10,
                                 workers=2)
  batches = pipeline.prefetch_to_device(host, sharding.batch_sharding(mesh))
  seen = []
  for _ in range(240 // 48):  # one epoch
    device_batch = next(batches)
    assert len(device_batch["label"].addressable_shards) == 8
    seen.append(jax.device_get(device_batch["label"]))
  batches.close()
  # The same epoch on the host: every example once, labels and pixels exact.
  host = pipeline.train_iterator(source, spec, global_batch=48, seed=0, num_classes=10,
                                 workers=2)
  epoch = [next(host) for _ in range(3)]
  state_after_three = host.get_state()
  epoch += [next(host) for _ in range(240 // 48 - 3)]
  host.close()
  resumed = pipeline.train_iterator(source, spec, global_batch=48, seed=0, num_classes=10,
                                    workers=2)
  resumed.set_state(state_after_three)  # The exact next batch, with worker processes.
  np.testing.assert_array_equal(next(resumed)["id"], epoch[3]["id"])
  resumed.close()
  assert set(np.concatenate([b["id"] for b in epoch]).tolist()) == set(labels)
  for batch, device_labels in zip(epoch, seen):
    np.testing.assert_array_equal(batch["label"], device_labels)
    for example_id, label, image in zip(batch["id"], batch["label"], batch["image"]):
      assert label == sorted_label(labels[example_id])
      original = np.asarray(Image.open(io.BytesIO((root / example_id).read_bytes())))
      # PNGs are lossless; JPEG decoders (libjpeg-turbo vs PIL) may differ by a level or two.
      tolerance = 0 if example_id.endswith(".png") else 3
      assert np.abs(image.astype(int) - original[..., None]).max() <= tolerance
