"""knn, retrieval and adaptive_retrieval evaluators against scikit-learn and numpy."""

import dataclasses
from typing import Dict, Tuple

import ml_collections
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from mrl_jax import sharding
from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import Embeddings, adaptive_retrieval, knn, retrieval

NUM_CLASSES = 6
DIMS = (4, 8, 16)


@dataclasses.dataclass
class Context:
  """Test plumbing with EvalContext's attributes: fixed embeddings per split."""
  splits: Dict[str, Embeddings]
  dims: Tuple[int, ...] = DIMS
  mesh: object = None
  step: int = 0
  workdir: str = ""
  config: object = None

  def embeddings(self, split):
    return self.splits[split]


def _split(rng, n, centroids):
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  scale = 1.0 / np.arange(1, centroids.shape[1] + 1)  # MRL-like: leading dims matter most
  z = ((centroids[labels] + rng.normal(size=(n, centroids.shape[1]))) * scale)
  return Embeddings(z=z.astype(np.float32), labels=labels, ids=np.arange(n))


@pytest.fixture(scope="module")
def ctx():
  rng = np.random.default_rng(0)
  centroids = rng.normal(size=(NUM_CLASSES, 16)) * 1.5
  return Context({"train": _split(rng, 240, centroids), "val": _split(rng, 45, centroids)},
                 mesh=sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1}))


def _config(**options):
  return ml_collections.ConfigDict(dict(type="x", **options))


def test_knn_matches_sklearn(ctx):
  train, val = ctx.splits["train"], ctx.splits["val"]
  result = knn.KnnEvaluator(_config(ks=(1, 5), query_batch=16, block_size=64),
                            dims=DIMS, num_classes=NUM_CLASSES).run(ctx)
  assert result.dims == list(DIMS)
  for i, m in enumerate(DIMS):
    for k in (1, 5):
      clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
      want = clf.fit(train.z[:, :m], train.labels).score(val.z[:, :m], val.labels)
      assert result.metrics[f"{k}nn_top1"][i] == pytest.approx(want), (m, k)
    # 1-NN by euclidean distance between the L2-normalised prefixes: the same neighbour.
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    nearest = NearestNeighbors(n_neighbors=1).fit(unit(train.z[:, :m]))
    idx = nearest.kneighbors(unit(val.z[:, :m]), return_distance=False)[:, 0]
    assert result.metrics["1nn_top1"][i] == pytest.approx(np.mean(train.labels[idx] ==
                                                                  val.labels))
  assert result.metrics["1nn_top1"][-1] > 1.5 / NUM_CLASSES  # the data have structure


def test_knn_vote_hand_worked():
  # Query 0: votes 2×class 1 vs 1×class 0 → 1 (right). Query 1: a 1–1 tie → class 0 (wrong).
  labels = np.array([[0, 1, 1], [2, 0, 1]])
  assert knn.knn_accuracy(labels[:, :3], np.array([1, 1]), 3) == 0.5
  assert knn.knn_accuracy(labels[:, 1:], np.array([1, 0]), 3) == 1.0
  # Multi-hot: neighbours {0,2}, {2}, {1} → class 2 wins; the query holding 2 is right.
  multi = np.array([[[1, 0, 1], [0, 0, 1], [0, 1, 0]]] * 2, np.uint8)
  assert knn.knn_accuracy(multi, np.array([[0, 0, 1], [1, 1, 0]], np.uint8), 3) == 0.5


def _numpy_retrieval(labels, query_labels, counts, k):
  """AP@k (÷k), precision@k and recall@k (true counts) per query, averaged."""
  ap, precision, recall = [], [], []
  for row, q in zip(labels[:, :k], query_labels):
    match = row == q
    ap.append(sum(match[:i + 1].sum() / (i + 1) for i in range(k) if match[i]) / k)
    precision.append(match.sum() / k)
    recall.append(match.sum() / counts[q])
  return np.mean(ap), np.mean(precision), np.mean(recall)


def test_retrieval_matches_sklearn_neighbours(ctx):
  train, val = ctx.splits["train"], ctx.splits["val"]
  result = retrieval.RetrievalEvaluator(
      _config(ks=(10, 25), dims=(4, 16), max_train_examples=200, query_batch=8),
      dims=DIMS, num_classes=NUM_CLASSES).run(ctx)
  assert result.extra["database_size"] == 200 and result.dims == [4, 16]
  assert result.extra["mflops"] == [200 * 4 / 1e6, 200 * 16 / 1e6]
  # The subset is random: recover it from the reported size and check through it.
  rows = np.sort(np.random.default_rng(0).choice(240, 200, replace=False))
  db_z, db_labels = train.z[rows], train.labels[rows]
  counts = np.bincount(db_labels, minlength=NUM_CLASSES)
  for i, m in enumerate((4, 16)):
    nn = NearestNeighbors(n_neighbors=25, metric="cosine", algorithm="brute").fit(db_z[:, :m])
    labels = db_labels[nn.kneighbors(val.z[:, :m], return_distance=False)]
    for k in (10, 25):
      ap, precision, recall = _numpy_retrieval(labels, val.labels, counts, k)
      assert result.metrics[f"mAP@{k}"][i] == pytest.approx(ap)
      assert result.metrics[f"precision@{k}"][i] == pytest.approx(precision)
      assert result.metrics[f"recall@{k}"][i] == pytest.approx(recall)
      hits = np.mean((labels[:, :k] == val.labels[:, None]).any(axis=1))
      assert result.metrics[f"top{k}_hit"][i] == pytest.approx(hits)
    assert result.metrics["top1"][i] == pytest.approx(np.mean(labels[:, 0] == val.labels))
  assert list(result.metrics)[0] == "mAP@10"


def _numpy_funnel(queries, database, dims, ks):
  """Per query: cosine shortlist at dims[0], then rerank at each later dim."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  out = []
  for q in queries:
    short = np.argsort(-(unit(database[:, :dims[0]]) @ unit(q[:dims[0]])), kind="stable")
    short = short[:ks[0]]
    for m, keep in zip(dims[1:], list(ks[1:]) + [ks[-1]]):
      short = np.sort(short)
      scores = unit(database[short, :m]) @ unit(q[:m])
      short = short[np.argsort(-scores, kind="stable")[:keep]]
    out.append(short)
  return np.array(out)


def test_adaptive_retrieval_against_numpy(ctx):
  train, val = ctx.splits["train"], ctx.splits["val"]
  options = dict(ks=(10,), dims=(4, 16), shortlist_dim=4, rerank_dim=16, shortlist_k=30,
                 funnel_dims=(4, 8, 16), funnel_ks=(40, 12), query_batch=16, block_size=100)
  result = adaptive_retrieval.AdaptiveRetrievalEvaluator(
      _config(**options), dims=DIMS, num_classes=NUM_CLASSES).run(ctx)
  counts = np.bincount(train.labels, minlength=NUM_CLASSES)
  n = len(train.labels)

  def check(entry, dims, ks, mflops):
    indices = _numpy_funnel(val.z, train.z, dims, ks)
    exact = _numpy_funnel(val.z, train.z, (16, 16), (10,))
    ap, _, _ = _numpy_retrieval(train.labels[indices], val.labels, counts, 10)
    assert entry["mAP@10"] == pytest.approx(ap)
    assert entry["top1"] == pytest.approx(np.mean(train.labels[indices[:, 0]] == val.labels))
    assert entry["overlap_with_exact@10"] == pytest.approx(np.mean(
        [len(set(a[:10]) & set(b)) / 10 for a, b in zip(indices, exact)]))
    assert entry["mflops_per_query"] == pytest.approx(mflops)
    assert entry["queries_per_sec"] > 0

  check(result.extra["exact"], (16, 16), (10,), n * 16 / 1e6)
  check(result.extra["adaptive"], (4, 16), (30,), (n * 4 + 30 * 16) / 1e6)
  check(result.extra["funnel"], (4, 8, 16), (40, 12), (n * 4 + 40 * 8 + 12 * 16) / 1e6)
  assert result.extra["exact"]["overlap_with_exact@10"] == 1.0
  # Shortlisting at D_s = D_r is exact search.
  assert result.metrics["overlap_with_exact@10"][1] == 1.0
  assert result.metrics["mAP@10"][1] == pytest.approx(result.extra["exact"]["mAP@10"])
  assert result.metrics["mAP@10"][0] == pytest.approx(result.extra["adaptive"]["mAP@10"])
  assert result.extra["mflops"] == pytest.approx(
      [(n * 4 + 30 * 16) / 1e6, (n * 16 + 30 * 16) / 1e6])


def test_default_funnel_follows_the_paper():
  assert adaptive_retrieval.default_funnel(2048) == ((16, 32, 64, 128, 256, 2048),
                                                     (200, 100, 50, 25, 10))
  assert adaptive_retrieval.default_funnel(128) == ((16, 32, 64, 128), (200, 100, 10))


def test_evaluators_reject_bad_options(ctx):
  with pytest.raises(ConfigError, match="Unknown option"):
    knn.KnnEvaluator(_config(kk=3), dims=DIMS, num_classes=NUM_CLASSES)
  with pytest.raises(ConfigError, match="lie in 1..16"):
    retrieval.RetrievalEvaluator(_config(dims=(4, 32)), dims=DIMS,
                                 num_classes=NUM_CLASSES).run(ctx)
  with pytest.raises(ConfigError, match="database has 240 rows"):
    retrieval.RetrievalEvaluator(_config(ks=(10, 300)), dims=DIMS,
                                 num_classes=NUM_CLASSES).run(ctx)
