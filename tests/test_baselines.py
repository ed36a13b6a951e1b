"""SVD and random-selection baselines against numpy, on arrays and on memmaps on disk."""

import ml_collections
import numpy as np
import pytest

from mrl_jax.errors import ConfigError
from mrl_jax import evaluators
from mrl_jax.evaluators import baselines


def _data(seed=0, n=300, q=50, d=12):
  rng = np.random.default_rng(seed)
  scale = np.linspace(3.0, 0.5, d)  # Distinct singular values, so the basis is unique.
  mix = np.linalg.qr(rng.normal(size=(d, d)))[0]
  return ((rng.normal(size=(n, d)) * scale) @ mix).astype(np.float32), \
      ((rng.normal(size=(q, d)) * scale) @ mix).astype(np.float32)


def test_prefix_is_plain_slicing():
  train, val = _data()
  for m in (1, 5, 12):
    got_train, got_val = baselines.features_at_dim(train, val, m, "prefix")
    np.testing.assert_array_equal(got_train, train[:, :m])
    np.testing.assert_array_equal(got_val, val[:, :m])


def test_svd_matches_numpy_svd():
  train, val = _data()
  _, singular, vt = np.linalg.svd(train.astype(np.float64), full_matrices=False)
  assert np.all(np.diff(singular) < 0)
  features = baselines.Features(train, val, "svd")
  for m in (1, 4, 12):
    got_train, got_val = features.at_dim(m)
    want_train, want_val = train @ vt[:m].T, val @ vt[:m].T
    signs = np.sign(np.sum(got_train * want_train, axis=0))  # SVD signs are arbitrary.
    np.testing.assert_allclose(got_train, want_train * signs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_val, want_val * signs, rtol=1e-4, atol=1e-4)
  # Nested: the features at m are the first m columns of those at the full width.
  full_train, _ = features.at_dim(12)
  np.testing.assert_array_equal(features.at_dim(4)[0], full_train[:, :4])


def test_random_selection_picks_distinct_nested_columns():
  train, val = _data()
  seen = []
  for seed in (0, 1):
    features = baselines.Features(train, val, "random", seed)
    full_train, full_val = features.at_dim(12)
    # Every full-width column is one original coordinate, each used exactly once.
    columns = [int(np.flatnonzero(np.all(train == full_train[:, [j]], axis=0))[0])
               for j in range(12)]
    assert sorted(columns) == list(range(12))
    np.testing.assert_array_equal(full_val, val[:, columns])
    for m in (3, 7):
      got_train, got_val = features.at_dim(m)
      np.testing.assert_array_equal(got_train, train[:, columns[:m]])
      np.testing.assert_array_equal(got_val, val[:, columns[:m]])
    seen.append(columns)
  assert seen[0] != seen[1]


def test_memmap_float16_rows(tmp_path):
  train, val = _data(n=200)
  path = tmp_path / "train.f16"
  disk = np.memmap(path, np.float16, "w+", shape=train.shape)
  disk[:] = train
  disk.flush()
  on_disk = np.memmap(path, np.float16, "r", shape=train.shape)
  exact = train.astype(np.float16).astype(np.float32)
  rows = np.array([3, 7, 150])
  for method in baselines.METHODS:
    from_disk = baselines.Features(on_disk, val, method, seed=2)
    in_memory = baselines.Features(exact, val, method, seed=2)
    got = from_disk.take("train", rows, 6)
    assert got.dtype == np.float32 and got.shape == (3, 6)
    np.testing.assert_allclose(got, in_memory.take("train", rows, 6), rtol=1e-5, atol=1e-5)


def test_bad_options_name_the_fix():
  train, val = _data()
  with pytest.raises(ConfigError, match="features"):
    baselines.Features(train, val, "pca")
  with pytest.raises(ConfigError, match="dims"):
    baselines.features_at_dim(train, val, 13)


def test_subsample():
  np.testing.assert_array_equal(baselines.subsample(5, 0), np.arange(5))
  rows = baselines.subsample(1000, 10, seed=3)
  assert len(np.unique(rows)) == 10 and np.all(np.diff(rows) > 0) and rows.max() < 1000


def test_evaluator_options_reject_typos():
  defaults = {"epochs": 10, "dims": ()}
  block = ml_collections.ConfigDict({"type": "linear_probe", "name": "lp", "epochs": 3})
  assert evaluators.evaluator_options(block, defaults, "linear_probe") == {"epochs": 3,
                                                                          "dims": ()}
  block.epoch = 3
  with pytest.raises(ConfigError, match=r"\['epoch'\].*linear_probe.*\['dims', 'epochs'\]"):
    evaluators.evaluator_options(block, defaults, "linear_probe")
  with pytest.raises(ConfigError, match="multi-hot"):
    baselines.check_single_label(np.zeros((4, 3), np.uint8), "few_shot")
