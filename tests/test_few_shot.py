"""Few-shot least squares against a float64 numpy solve of the same closed form."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from mrl_jax.evaluators import Embeddings, baselines, few_shot

DIMS = (2, 8, 24)


def _reference(train_x, train_y, val_x, val_y, m, num_classes, l2_reg):
  """big_vision's recipe on the m-dim slice, solved directly in the primal form."""
  x = train_x[:, :m].astype(np.float64)
  mean, std = x.mean(0), x.std(0) + 1e-5
  def design(z):
    z = (z[:, :m] - mean) / std
    return np.concatenate([z, np.full((len(z), 1), 100.0)], axis=1)
  a = design(x)
  targets = 2.0 * np.eye(num_classes)[train_y] - 1.0
  w = np.linalg.solve(a.T @ a + l2_reg * np.eye(a.shape[1]), a.T @ targets)
  return np.mean(np.argmax(design(val_x.astype(np.float64)) @ w, axis=1) == val_y)


def _data(num_classes=6, d=24, n=300, q=120):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(num_classes, d)) * np.linspace(1.5, 0.2, d)
  def split(count):
    y = rng.integers(0, num_classes, count)
    return (centres[y] + rng.normal(size=(count, d))).astype(np.float32), y
  return split(n), split(q)


def test_shot_indices_take_n_per_class():
  labels = np.array([0] * 7 + [1] * 2 + [2] * 5)
  rows = few_shot.shot_indices(labels, 3, 3, seed=1)
  assert np.bincount(labels[rows]).tolist() == [3, 2, 3]  # Class 1 has only 2 examples.
  assert len(np.unique(rows)) == len(rows)
  assert not np.array_equal(np.sort(rows), np.sort(few_shot.shot_indices(labels, 3, 3, 2)))


@pytest.mark.parametrize("shots", [1, 10])  # 6 rows < 25 = width + 1 (dual); 60 (primal).
def test_accuracy_matches_numpy_closed_form(shots):
  (train_x, train_y), (val_x, val_y) = _data()
  features = baselines.Features(train_x, val_x)
  for seed in range(2):
    got = few_shot.fewshot_accuracy(features, train_y, val_y, DIMS, 6, shots=shots,
                                    seed=seed, l2_reg=2.0 ** 10, batch_size=64)
    rows = np.sort(few_shot.shot_indices(train_y, 6, shots, seed))
    want = [_reference(train_x[rows], train_y[rows], val_x, val_y, m, 6, 2.0 ** 10)
            for m in DIMS]
    np.testing.assert_allclose(got, want, atol=1.5 / len(val_y))


@dataclasses.dataclass
class _Context:
  """Test plumbing: the attributes and method of EvalContext this evaluator uses."""
  train: Embeddings
  val: Embeddings
  mesh: jax.sharding.Mesh = None

  def embeddings(self, split):
    return {"train": self.train, "val": self.val}[split]


def test_evaluator_reports_every_shot_and_dim():
  (train_x, train_y), (val_x, val_y) = _data()
  ctx = _Context(Embeddings(train_x, train_y, np.arange(len(train_y))),
                 Embeddings(val_x, val_y, np.arange(len(val_y))))
  config = ml_collections.ConfigDict(dict(shots=(1, 25), num_seeds=2, features="svd"))
  result = few_shot.FewShotEvaluator(config, dims=DIMS, num_classes=6).run(ctx)
  assert result.dims == list(DIMS) and sorted(result.metrics) == ["1shot", "25shot"]
  svd_train, svd_val = baselines.features_at_dim(train_x, val_x, 24, "svd")
  for shots in (1, 25):
    runs = []
    for seed in range(2):
      rows = np.sort(few_shot.shot_indices(train_y, 6, shots, seed))
      runs.append([_reference(svd_train[rows], train_y[rows], svd_val, val_y, m, 6, 2.0 ** 10)
                   for m in DIMS])
    np.testing.assert_allclose(result.metrics[f"{shots}shot"], np.mean(runs, 0),
                               atol=1.5 / len(val_y))
    np.testing.assert_allclose(result.extra["std"][f"{shots}shot"], np.std(runs, 0),
                               atol=1.5 / len(val_y))
  assert result.metrics["25shot"][-1] > 0.6 > 1 / 6  # Separable classes: well above chance.
