"""k-NN classification per dim: the majority label of a val query's k nearest train rows.

Database = train embeddings, queries = val, both sliced to z[:m] and then
L2-normalised (cosine similarity), as MRL.md defines 1-NN. Each of the k
neighbours gets one vote; ties between classes go to the smaller class id,
as in scikit-learn's KNeighborsClassifier. k = 1 is the 1-NN accuracy. With
multi-hot labels a neighbour votes for each of its classes, and a prediction
is correct when the query has the predicted class (precision@1).
"""

from typing import Optional

import numpy as np

from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator, neighbors

DEFAULTS = dict(neighbors.SEARCH_DEFAULTS, ks=(1, 10, 20))
_VOTE_ROWS = 4096  # queries voted at once: bounds the [rows, classes] vote table


def knn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray,
                 num_classes: int, misses: Optional[np.ndarray] = None) -> float:
  """Fraction of queries whose neighbours' majority class is theirs.

  Args:
    neighbor_labels: [Q, k] class ids, or [Q, k, L] multi-hot, nearest first.
    query_labels: [Q] class ids, or [Q, L] multi-hot.
    num_classes: C, the number of classes (L for multi-hot).
    misses: [Q] bool, queries counted wrong whatever their neighbours (degenerate ones).
  """
  correct = 0
  for start in range(0, len(query_labels), _VOTE_ROWS):
    labels = neighbor_labels[start:start + _VOTE_ROWS]
    truth = query_labels[start:start + _VOTE_ROWS]
    if labels.ndim == 2:
      votes = np.zeros((len(labels), num_classes), np.int32)
      np.add.at(votes, (np.arange(len(labels))[:, None], labels), 1)
    else:
      votes = labels.astype(np.int32).sum(axis=1)
    predicted = np.argmax(votes, axis=1)  # the first (smallest) class among ties
    hits = truth == predicted if truth.ndim == 1 else truth[np.arange(len(truth)), predicted]
    if misses is not None:
      hits = hits & ~misses[start:start + _VOTE_ROWS]
    correct += int(np.count_nonzero(hits))
  return correct / len(query_labels)


@EVALUATORS.register("knn")
class KnnEvaluator(Evaluator):
  """Options: ks (neighbour counts; metric "<k>nn_top1" each), dims (() → trained),
  features ("prefix" | "svd" | "random"), database_split, query_split,
  max_train_examples (0 → all of the database split), block_size, query_batch, seed.
  """

  DEFAULTS = DEFAULTS

  def run(self, ctx) -> EvalResult:
    o = self.options
    ks = tuple(sorted(int(k) for k in o["ks"]))
    width = ctx.embeddings(o["query_split"]).z.shape[1]
    dims = neighbors.eval_dims(o["dims"], self.trained_dims, width, "knn")
    data = neighbors.load(ctx, o, max(dims))
    neighbors.check_k(ks[-1], len(data.db_labels), "knn", "ks")
    metrics = {f"{k}nn_top1": [] for k in ks}
    metrics.update(degenerate_queries=[], degenerate_database=[])
    for m in dims:
      misses, q_fraction, db_fraction = data.degenerate(m, self.name)
      neighbor_labels = data.db_labels[data.top_k(m, ks[-1])]
      for k in ks:
        metrics[f"{k}nn_top1"].append(knn_accuracy(
            neighbor_labels[:, :k], data.query_labels, self.num_classes, misses))
      metrics["degenerate_queries"].append(q_fraction)
      metrics["degenerate_database"].append(db_fraction)
    return EvalResult(name=self.name, dims=list(dims), metrics=metrics,
                      extra={"database_size": len(data.db_labels),
                             "num_queries": len(data.query_labels), "features": o["features"]})
