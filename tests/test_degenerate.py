"""All-zero and non-finite prefixes: ranked last in search, misses in knn/retrieval,
counted per dim; checked against numpy and by hand."""

import numpy as np
import pytest

from mrl_jax.evaluators import Embeddings, knn, retrieval, search
from tests.test_knn_retrieval import Context, _config

NUM_CLASSES = 3


def _numpy_cosine_top_k(queries, database, k, m):
  """Reference: degenerate rows (zero / non-finite prefix) after every valid row, by
  index; a degenerate query scores every valid row 0."""
  q, db = queries[:, :m].astype(np.float64), database[:, :m].astype(np.float64)
  db_ok = np.isfinite(db).all(1) & (np.abs(db).sum(1) > 0)
  q_ok = np.isfinite(q).all(1) & (np.abs(q).sum(1) > 0)
  unit = lambda x, ok: np.where(ok[:, None], x / np.where(ok, np.linalg.norm(
      np.where(np.isfinite(x), x, 0), axis=1), 1)[:, None], 0)
  scores = unit(np.where(np.isfinite(q), q, 0), q_ok) @ unit(np.where(np.isfinite(db), db, 0), db_ok).T
  scores[:, ~db_ok] = -np.inf
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("block_size", [3, 4, 100])
def test_degenerate_database_rows_rank_last(block_size):
  rng = np.random.default_rng(block_size)
  database = rng.normal(size=(10, 4)).astype(np.float32)
  database[[0, 3], :2] = 0.0        # zero 2-dim prefix, valid at 4 dims
  database[5, 1] = np.nan           # non-finite at every dim ≥ 2
  database[7] = 0.0                 # zero at every dim
  queries = rng.normal(size=(6, 4)).astype(np.float32)
  queries[1, :2] = 0.0
  queries[4, 0] = np.inf
  for m in (2, 4):
    _, idx = search.top_k(queries, database, 10, dim=m, cosine=True, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(idx), _numpy_cosine_top_k(queries, database, 10, m))
  _, idx = search.top_k(queries, database, 10, dim=2, cosine=True, block_size=block_size)
  assert set(np.asarray(idx)[0, -4:]) == {0, 3, 5, 7}  # the four degenerate rows, last
  np.testing.assert_array_equal(search.degenerate_rows(database, 2),
                                np.isin(np.arange(10), [0, 3, 5, 7]))
  np.testing.assert_array_equal(search.degenerate_rows(database, 4),
                                np.isin(np.arange(10), [5, 7]))


def _zero_prefix_context():
  # Two-dim prefixes: half the val rows are all zero at m=1... and at m=2 one stays zero.
  train_z = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 2], [2, 0, 0], [0, 3, 0]],
                     np.float32)
  train_y = np.array([0, 1, 2, 2, 0, 1], np.int32)
  val_z = np.array([[0, 0, 1],     # degenerate at m=1 and m=2; class 2 at m=3
                    [3, 0, 0],     # class 0
                    [0, 2, 0],     # degenerate at m=1, class 1 at m=2
                    [0, 0, 0]],    # degenerate everywhere
                   np.float32)
  val_y = np.array([2, 0, 1, 0], np.int32)
  return Context({"train": Embeddings(train_z, train_y, np.arange(6)),
                  "val": Embeddings(val_z, val_y, np.arange(4))}, dims=(1, 2, 3))


def test_knn_counts_degenerate_queries_as_misses_and_reports_fractions():
  ctx = _zero_prefix_context()
  result = knn.KnnEvaluator(_config(ks=(1,)), dims=(1, 2, 3), num_classes=NUM_CLASSES).run(ctx)
  # m=1: only val row 1 has a direction (→ train row 0 or 4, class 0: hit). Rows 0, 2, 3
  # would "find" train row 0 (class 0) by index order; row 3 is class 0 but must miss.
  assert result.metrics["1nn_top1"] == [pytest.approx(1 / 4), pytest.approx(2 / 4),
                                        pytest.approx(3 / 4)]
  assert result.metrics["degenerate_queries"] == [pytest.approx(3 / 4), pytest.approx(2 / 4),
                                                  pytest.approx(1 / 4)]
  # Train rows with a zero prefix: m=1 → 4 of 6 (rows 1, 2, 3, 5); m=2 → 2; m=3 → 0.
  assert result.metrics["degenerate_database"] == [pytest.approx(4 / 6), pytest.approx(2 / 6),
                                                   0.0]


def test_retrieval_scores_degenerate_queries_zero():
  ctx = _zero_prefix_context()
  result = retrieval.RetrievalEvaluator(_config(ks=(1, 2)), dims=(1, 2, 3),
                                        num_classes=NUM_CLASSES).run(ctx)
  assert result.metrics["top1"] == [pytest.approx(1 / 4), pytest.approx(2 / 4),
                                    pytest.approx(3 / 4)]
  # m=3: queries 0, 1, 2 have both same-class train rows as their top 2 → precision@2 = 1.
  assert result.metrics["precision@2"][-1] == pytest.approx(3 / 4)
  assert result.metrics["degenerate_queries"][0] == pytest.approx(3 / 4)
