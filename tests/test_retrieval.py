"""Retrieval metrics against plain loops, and the top-k search against numpy (sharded:
tests/test_search.py)."""

import numpy as np
import pytest

from mrl_jax.evaluators import retrieval_metrics as rm
from mrl_jax.evaluators import search


def _loop_metrics(neighbor_labels, query_labels, class_counts, ks):
  """Independent per-query reference: explicit loops over ranks."""
  out = {}
  for k in ks:
    sums = {"precision": 0.0, "ap": 0.0, "recall": 0.0, "hit": 0.0}
    for row, label in zip(neighbor_labels, query_labels):
      hits, ap = 0, 0.0
      for i in range(1, k + 1):
        if row[i - 1] == label:
          hits += 1
          ap += hits / i
      sums["precision"] += hits / k
      sums["ap"] += ap / k
      sums["recall"] += hits / class_counts[label] if class_counts[label] else 0.0
      sums["hit"] += 1.0 if hits else 0.0
    q = len(query_labels)
    out.update({f"precision@{k}": sums["precision"] / q, f"ap@{k}": sums["ap"] / q,
                f"recall@{k}": sums["recall"] / q, f"top{k}_hit": sums["hit"] / q})
  return out


def test_metrics_match_loops_on_random_data():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=(13, 100))
  queries = rng.integers(0, 5, size=13)
  counts = rng.integers(1, 200, size=5)
  got = rm.retrieval_metrics(labels, queries, counts)
  want = _loop_metrics(labels, queries, counts, (10, 25, 50, 100))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
  one_nn = np.mean([row[0] == q for row, q in zip(labels, queries)])
  assert rm.one_nn_accuracy(labels, queries) == pytest.approx(one_nn)


def test_metrics_hand_worked():
  counts = np.array([3, 5])
  got = rm.retrieval_metrics(np.array([[0, 1, 0, 1]]), np.array([0]), counts, ks=(4,))
  assert got["ap@4"] == pytest.approx((1 / 1 + 2 / 3) / 4)
  assert got["precision@4"] == pytest.approx(2 / 4)
  assert got["recall@4"] == pytest.approx(2 / 3)
  assert got["top4_hit"] == 1.0
  none = rm.retrieval_metrics(np.array([[1, 1, 1, 1]]), np.array([0]), counts, ks=(4,))
  assert all(v == 0.0 for v in none.values())
  # Averaged over queries: the two queries above together halve each value.
  both = rm.retrieval_metrics(np.array([[0, 1, 0, 1], [1, 1, 1, 1]]), np.array([0, 0]),
                              counts, ks=(2, 4))
  assert both["ap@4"] == pytest.approx((1 + 2 / 3) / 8)
  assert both["precision@2"] == pytest.approx(1 / 4)
  assert rm.one_nn_accuracy(np.array([[0, 1], [1, 0]]), np.array([0, 0])) == 0.5


def test_metrics_reject_too_few_neighbours():
  with pytest.raises(ValueError, match="search with k >= 100"):
    rm.retrieval_metrics(np.zeros((2, 50), int), np.zeros(2, int), np.ones(1, int))


def _numpy_top_k(queries, database, k):
  scores = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
  idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, idx, axis=1), idx


@pytest.mark.parametrize("block_size", [1, 7, 37, 50])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_blocked_top_k_matches_numpy(block_size, k):
  rng = np.random.default_rng(block_size * 100 + k)
  queries = rng.normal(size=(6, 8)).astype(np.float32)
  database = rng.normal(size=(37, 8)).astype(np.float32)
  scores, idx = search.top_k(queries, database, k, block_size=block_size)
  want_scores, want_idx = _numpy_top_k(queries, database, k)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 7, 40, 64])
def test_blocked_top_k_ties_prefer_lower_index(block_size):
  # Small integers give exact float32 products, so ties are real ties.
  rng = np.random.default_rng(1)
  base = rng.integers(-2, 3, size=(10, 4)).astype(np.float32)
  database = np.concatenate([base, base, base[::-1], base])  # every row duplicated
  queries = rng.integers(-2, 3, size=(5, 4)).astype(np.float32)
  for k in (3, 17, 40):
    scores, idx = search.top_k(queries, database, k, block_size=block_size)
    want_scores, want_idx = _numpy_top_k(queries, database, k)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_array_equal(np.asarray(scores), want_scores)


def test_blocked_top_k_validates():
  with pytest.raises(ValueError, match="lower k"):
    search.top_k(np.ones((2, 3)), np.ones((4, 3)), 5, block_size=2)


def test_normalize_is_safe_for_zero_rows():
  x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(np.asarray(search.normalize(x)), [[0.6, 0.8], [0, 0]])


def test_search_at_dim_slices_before_normalising():
  rng = np.random.default_rng(3)
  queries = rng.normal(size=(7, 16)).astype(np.float32)
  database = rng.normal(size=(30, 16)).astype(np.float32)
  # Large tail dims make "normalise, then slice" rank differently.
  queries[:, 4:] *= rng.uniform(0.1, 10, size=(7, 1))
  database[:, 4:] *= rng.uniform(0.1, 10, size=(30, 1))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  want_scores, want_idx = _numpy_top_k(unit(queries[:, :4]), unit(database[:, :4]), 5)
  scores, idx = search.top_k(queries, database, 5, dim=4, cosine=True, block_size=8)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)
  wrong_scores, _ = _numpy_top_k(unit(queries)[:, :4], unit(database)[:, :4], 5)
  assert not np.allclose(np.asarray(scores), wrong_scores, atol=1e-3)
