"""Retrieval metrics over ranked neighbour labels, exactly as MRL.md defines them.

Every metric is computed per query, then averaged over queries. AP@k is the
paper's "corrected mAP@k" (divided by k, not by the number of matches), and
recall@k divides by the true database count of the query's class rather than
the reference's hard-coded 1300.
"""

from typing import Dict, Sequence

import numpy as np

DEFAULT_KS = (10, 25, 50, 100)


def _check(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> None:
  if neighbor_labels.ndim != 2 or query_labels.shape != neighbor_labels.shape[:1]:
    raise ValueError(f"neighbor_labels must be [Q, K] and query_labels [Q]; got "
                     f"{neighbor_labels.shape} and {query_labels.shape}.")


def retrieval_metrics(neighbor_labels: np.ndarray, query_labels: np.ndarray,
                      class_counts: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
  """precision@k, ap@k, recall@k and topk_hit for each k, averaged over queries.

  Args:
    neighbor_labels: [Q, K] labels of each query's database neighbours, nearest first.
    query_labels: [Q] label of each query.
    class_counts: [C] number of database items per class (recall's denominator).
    ks: cut-offs; each must be <= K.
  """
  neighbor_labels = np.asarray(neighbor_labels)
  query_labels = np.asarray(query_labels)
  class_counts = np.asarray(class_counts)
  _check(neighbor_labels, query_labels)
  if not ks:
    return {}
  if neighbor_labels.shape[1] < max(ks):
    raise ValueError(f"Retrieval at k={max(ks)} needs at least {max(ks)} neighbours per "
                     f"query but got {neighbor_labels.shape[1]}; search with "
                     f"k >= {max(ks)} or drop the larger values from ks.")
  matches = (neighbor_labels == query_labels[:, None]).astype(np.float64)
  # A class absent from the database has no matches, so its recall is 0, not 0/0.
  counts = np.maximum(class_counts[query_labels].astype(np.float64), 1.0)
  ranks = np.arange(1, matches.shape[1] + 1, dtype=np.float64)
  precision_at_i = np.cumsum(matches, axis=1) / ranks  # Σ_{j≤i} match_j / i
  out = {}
  for k in ks:
    hits = matches[:, :k].sum(axis=1)
    out[f"precision@{k}"] = float(np.mean(hits / k))
    out[f"ap@{k}"] = float(np.mean((precision_at_i[:, :k] * matches[:, :k]).sum(axis=1) / k))
    out[f"recall@{k}"] = float(np.mean(hits / counts))
    out[f"top{k}_hit"] = float(np.mean(hits > 0))
  return out


def one_nn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> float:
  """Fraction of queries whose nearest database item has the query's label."""
  neighbor_labels = np.asarray(neighbor_labels)
  query_labels = np.asarray(query_labels)
  _check(neighbor_labels, query_labels)
  return float(np.mean(neighbor_labels[:, 0] == query_labels))
