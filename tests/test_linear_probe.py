"""Linear probes (all dims in one sharded step) against sklearn's LogisticRegression."""

import dataclasses

import jax
import ml_collections
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mrl_jax import sharding
from mrl_jax.evaluators import Embeddings, baselines, linear_probe


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, model=1)))


def _sklearn_accuracy(train_x, train_y, val_x, val_y, m):
  scaler = StandardScaler().fit(train_x[:, :m])
  model = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x[:, :m]), train_y)
  return model.score(scaler.transform(val_x[:, :m]), val_y)


def test_matches_sklearn_on_gaussian_classes():
  rng = np.random.default_rng(0)
  dims = (1, 3, 6, 12)
  centres = rng.normal(size=(4, 12)) * np.linspace(1.2, 0.3, 12)
  y = rng.integers(0, 4, 700)
  x = (centres[y] + rng.normal(size=(700, 12)) * 0.7).astype(np.float32)
  train_x, train_y, val_x, val_y = x[:500], y[:500], x[500:], y[500:]
  features = baselines.Features(train_x, val_x)
  params = linear_probe.train_probes(features, np.arange(500), train_y, dims, 4, _mesh(),
                                     epochs=30, batch_size=128, learning_rate=0.1,
                                     weight_decay=1e-4)
  got = linear_probe.probe_accuracy(params, features, "val", val_y, dims, _mesh(), 64)
  want = [_sklearn_accuracy(train_x, train_y, val_x, val_y, m) for m in dims]
  np.testing.assert_allclose(got["top1"], want, atol=0.03)
  assert want[0] < 0.8 < want[-1]  # The dims differ, so each probe saw its own prefix.
  # top-5 of 4 classes is every class.
  np.testing.assert_array_equal(got["top5"], 1.0)
  # The sharded, padded evaluation equals a numpy forward pass of each probe on its prefix.
  x = (val_x - params["mean"]) / params["std"]
  for i, m in enumerate(dims):
    logits = x[:, :m] @ params["w"][i, :m] + params["b"][i]
    want_top1 = np.mean(np.argmax(logits, axis=1) == val_y)
    assert abs(got["top1"][i] - want_top1) <= 1.001 / len(val_y)  # One near-tie at most.


@dataclasses.dataclass
class _Context:
  """Test plumbing: the attributes and method of EvalContext this evaluator uses."""
  train: Embeddings
  val: Embeddings
  mesh: jax.sharding.Mesh

  def embeddings(self, split):
    return {"train": self.train, "val": self.val}[split]


def test_evaluator_beats_chance_on_digits_per_dim():
  images, labels = load_digits(return_X_y=True)
  rng = np.random.default_rng(1)
  z = (images @ rng.normal(size=(64, 32))).astype(np.float32)  # "Embeddings".
  train = Embeddings(z[:1300], labels[:1300].astype(np.int32), np.arange(1300))
  val = Embeddings(z[1300:], labels[1300:].astype(np.int32), np.arange(1300, len(z)))
  dims = (2, 8, 32)
  results = {}
  for method in ("prefix", "random"):
    config = ml_collections.ConfigDict(dict(epochs=20, batch_size=256, learning_rate=0.1,
                                            features=method, max_train_examples=1000))
    evaluator = linear_probe.LinearProbeEvaluator(config, dims=dims, num_classes=10)
    results[method] = evaluator.run(_Context(train, val, _mesh()))
  prefix = results["prefix"]
  assert prefix.dims == list(dims) and prefix.extra["train_examples"] == 1000
  top1 = np.array(prefix.metrics["top1"])
  assert np.all(top1 > 0.2) and top1[-1] > 0.85 and np.all(np.diff(top1) > 0)
  assert np.all(np.array(prefix.metrics["top5"]) >= top1)
  # At the full width a random selection holds the same information as the prefix.
  assert abs(results["random"].metrics["top1"][-1] - top1[-1]) < 0.03
  rows = baselines.subsample(1300, 1000, 0)
  want = _sklearn_accuracy(z[rows], labels[rows], z[1300:], labels[1300:], 32)
  assert abs(top1[-1] - want) < 0.03
