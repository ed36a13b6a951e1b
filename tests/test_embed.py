"""The embeddings' on-disk format: shards filled from sharded device batches, read back.

Rows come from global arrays sharded over the 8 test devices, the way the
forward pass returns them; what is read back is checked against the numpy rows
that went in (minus masked-out padding), across shard boundaries, for float16
and float32, integer and multi-hot labels, int and string ids.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from mrl_jax import embeddings, restore, sharding


def _write(out_dir, batches, *, dtype, shard_size, capacity):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
  batch_sharding = sharding.batch_sharding(mesh)
  writer = embeddings.ShardWriter(str(out_dir), 0, capacity, shard_size, np.dtype(dtype))
  for z, host in batches:
    writer.add(restore.local_rows(jax.device_put(z.astype(dtype), batch_sharding)), host)
  writer.close()
  embeddings.write_index(str(out_dir), 1, {"split": "val", "step": 3, "dtype": dtype})


def _batches(rng, num_batches, *, multi_label=False, str_ids=False):
  out = []
  for b in range(num_batches):
    z = rng.normal(size=(16, 24)).astype(np.float32)
    labels = (rng.integers(0, 2, size=(16, 5)).astype(np.uint8) if multi_label
              else rng.integers(0, 10, size=16).astype(np.int32))
    ids = np.arange(16 * b, 16 * (b + 1))
    mask = np.ones(16, np.int32)
    if b == num_batches - 1:
      mask[11:] = 0  # Padding of the last batch.
    mask[3] = 0 if b == 1 else mask[3]  # An unreadable image.
    out.append((z, {"label": labels, "mask": mask,
                    "id": ids.astype(str) if str_ids else ids}))
  return out


@pytest.mark.parametrize("dtype,shard_size", [("float32", 0), ("float16", 10)])
def test_shards_hold_exactly_the_unmasked_rows_in_order(tmp_path, dtype, shard_size):
  batches = _batches(np.random.default_rng(0), 3)
  _write(tmp_path, batches, dtype=dtype, shard_size=shard_size, capacity=43)
  keep = [h["mask"] == 1 for _, h in batches]
  want_z = np.concatenate([z[k] for (z, _), k in zip(batches, keep)]).astype(dtype)
  want_labels = np.concatenate([h["label"][k] for (_, h), k in zip(batches, keep)])
  want_ids = np.concatenate([h["id"][k] for (_, h), k in zip(batches, keep)])
  got = embeddings.read_embeddings(str(tmp_path))
  assert got.z.dtype == np.dtype(dtype) and got.z.shape == (42, 24)
  np.testing.assert_array_equal(got.z, want_z)
  np.testing.assert_array_equal(got.labels, want_labels)
  np.testing.assert_array_equal(got.ids, want_ids)
  index = json.loads((tmp_path / "index.json").read_text())
  assert index["num_examples"] == 42 and index["dim"] == 24 and index["step"] == 3
  counts = [s["count"] for s in index["shards"]]
  assert counts == ([42] if shard_size == 0 else [10, 10, 10, 10, 2])
  if shard_size == 0:
    assert isinstance(got.z, np.memmap)  # One shard: read lazily, not copied.


def test_multi_hot_labels_and_string_ids_round_trip(tmp_path):
  batches = _batches(np.random.default_rng(1), 2, multi_label=True, str_ids=True)
  _write(tmp_path, batches, dtype="float32", shard_size=7, capacity=32)
  got = embeddings.read_embeddings(str(tmp_path))
  keep = [h["mask"] == 1 for _, h in batches]
  np.testing.assert_array_equal(
      got.labels, np.concatenate([h["label"][k] for (_, h), k in zip(batches, keep)]))
  assert got.labels.dtype == np.uint8 and got.labels.shape == (26, 5)
  assert got.ids[0] == "0" and got.ids.dtype.kind == "U"


def test_missing_embeddings_and_unknown_splits_say_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m mrl_jax.embed"):
    embeddings.read_embeddings(str(tmp_path))
  config = ml_collections.ConfigDict({"input": {"source": "digits", "splits": {}},
                                      "embed": {"splits": {"v2": {"source": "folder"}}}})
  with pytest.raises(ValueError, match="config.embed.splits"):
    restore.split_input_config(config, "imagenet_a")
  assert restore.split_input_config(config, "v2").source == "folder"
  assert config.input.source == "digits"  # The run's own input config is unchanged.
