"""Cascade threshold search: a constructed example with a known answer and brute force."""

import dataclasses
import itertools

import ml_collections
import numpy as np
import pytest

from mrl_jax.evaluators import adaptive_classification as ac

DIMS = (4, 16, 64)


def _probs(confidence, prediction, num_classes=4):
  """One [C] probability row with max `confidence` on class `prediction`."""
  row = np.full(num_classes, (1.0 - confidence) / (num_classes - 1))
  row[prediction] = confidence
  return row


def _constructed(counts=(60, 20, 20)):
  """Easy: dim 4 confident and right. Medium: dim 4 unsure and wrong, dim 16 confident
  and right. Hard: dims 4 and 16 unsure and wrong. Dim 64 is always right."""
  patterns = [((0.95, True), (0.97, True), (0.9, True)),
              ((0.5, False), (0.9, True), (0.9, True)),
              ((0.4, False), (0.6, False), (0.7, True))]
  probs, kinds = [], []
  for kind, (count, pattern) in enumerate(zip(counts, patterns)):
    for _ in range(count):
      probs.append([_probs(conf, 0 if right else 1) for conf, right in pattern])
      kinds.append(kind)
  return np.transpose(np.array(probs), (1, 0, 2)), np.zeros(len(kinds), int), np.array(kinds)


def test_constructed_example_known_answer():
  probs, labels, kinds = _constructed()
  confidence, correct = probs.max(-1), probs.argmax(-1) == labels
  thresholds = ac.greedy_thresholds(confidence, correct, DIMS, penalty=0.01)
  assert 0.5 < thresholds[0] <= 0.95 and 0.6 < thresholds[1] <= 0.9
  stats = ac.cascade_stats(confidence, correct, DIMS, thresholds)
  assert stats["top1"] == 1.0
  assert stats["expected_dim"] == pytest.approx(0.6 * 4 + 0.2 * 16 + 0.2 * 64)
  # Without a cost on dims nothing beats (or ties more accurately than) the full dim.
  assert np.all(np.isinf(ac.greedy_thresholds(confidence, correct, DIMS, penalty=0.0)))

  result = ac.cascade_search(probs, labels, DIMS, holdout_fraction=0.3, num_seeds=4,
                             penalties=(0.0, 0.01))
  full, cheap = result["curve"]
  # The documented split: each seed permutes val and searches on the first 30%.
  rests = [kinds[np.random.default_rng(s).permutation(100)[30:]] for s in range(4)]
  assert result["top1"] == pytest.approx(
      [np.mean([np.mean(r == 0) for r in rests]), np.mean([np.mean(r < 2) for r in rests]), 1])
  assert (full["top1"], full["expected_dim"], full["top1_std"]) == (1.0, 64.0, 0.0)
  cost = np.array([4, 16, 64])
  assert cheap["top1"] == 1.0
  assert cheap["expected_dim"] == pytest.approx(np.mean([cost[r].mean() for r in rests]))
  assert result["matched"] == cheap
  assert len(cheap["thresholds"]) == 4 and full["thresholds"][0] == [None, None]


def _objective(confidence, correct, dims, thresholds, penalty):
  """Plain-loop reference: walk each example up the cascade."""
  total = 0.0
  for n in range(confidence.shape[1]):
    stop = len(dims) - 1
    for i, t in enumerate(thresholds):
      if confidence[i, n] >= t:
        stop = i
        break
    total += float(correct[stop, n]) - penalty * dims[stop] / dims[-1]
  return total / confidence.shape[1]


def _random(seed, m, n=40):
  rng = np.random.default_rng(seed)
  confidence = np.round(rng.uniform(0.2, 1.0, size=(m, n)), 2)
  correct = rng.uniform(size=(m, n)) < confidence
  return confidence, correct


@pytest.mark.parametrize("seed", range(3))
def test_one_threshold_equals_brute_force(seed):
  confidence, correct = _random(seed, 2)
  grid = [np.inf] + list(np.linspace(1.0, 0.0, 11))
  for penalty in (0.0, 0.1, 0.5):
    values = [_objective(confidence, correct, (8, 32), [t], penalty) for t in grid]
    best = grid[int(np.argmax(values))]  # First maximum = the largest threshold.
    got = ac.greedy_thresholds(confidence, correct, (8, 32), penalty, num_thresholds=11)
    assert got[0] == best


def test_greedy_is_coordinatewise_optimal_and_near_exhaustive():
  confidence, correct = _random(7, 3)
  grid = [np.inf] + list(np.linspace(1.0, 0.0, 11))
  got = ac.greedy_thresholds(confidence, correct, DIMS, 0.2, num_thresholds=11, passes=10)
  value = _objective(confidence, correct, DIMS, got, 0.2)
  for i, t in itertools.product(range(2), grid):
    other = got.copy()
    other[i] = t
    assert _objective(confidence, correct, DIMS, other, 0.2) <= value + 1e-12
  best = max(_objective(confidence, correct, DIMS, ts, 0.2)
             for ts in itertools.product(grid, grid))
  assert value >= best - 0.05
  stats = ac.cascade_stats(confidence, correct, DIMS, got)
  assert stats["top1"] - 0.2 * stats["expected_dim"] / 64 == pytest.approx(value)


def test_softmax_confidence_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 20, 5)) * 4
  labels = rng.integers(0, 5, 20)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  confidence, correct = ac.softmax_confidence(logits, labels)
  np.testing.assert_allclose(confidence, probs.max(-1), rtol=1e-12)
  np.testing.assert_array_equal(correct, probs.argmax(-1) == labels)


@dataclasses.dataclass
class _Context:
  """Test plumbing: the one EvalContext method this evaluator calls."""
  val_logits: np.ndarray
  val_labels: np.ndarray

  def logits(self, split):
    assert split == "val"
    return self.val_logits, self.val_labels


def test_evaluator_on_a_subset_of_heads():
  probs, labels, kinds = _constructed()
  config = ml_collections.ConfigDict(dict(dims=(4, 64), num_seeds=2, penalties=(0.0, 0.01)))
  evaluator = ac.AdaptiveClassificationEvaluator(config, dims=DIMS, num_classes=4)
  result = evaluator.run(_Context(np.log(probs).astype(np.float32), labels))
  rests = [kinds[np.random.default_rng(s).permutation(100)[20:]] for s in range(2)]
  assert result.dims == [4, 64]
  assert result.metrics["top1"] == pytest.approx([np.mean([np.mean(r == 0) for r in rests]), 1])
  cheap = result.extra["curve"][1]
  assert cheap["top1"] == 1.0 and 4 < cheap["expected_dim"] < 64
  with pytest.raises(ValueError, match="no trained head"):
    ac.AdaptiveClassificationEvaluator(ml_collections.ConfigDict(dict(dims=(8,))), dims=DIMS,
                                       num_classes=4)
