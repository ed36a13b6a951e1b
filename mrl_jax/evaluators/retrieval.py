"""Retrieval per dim (the ImageNet protocol of MRL.md): mAP@k, precision@k, recall@k, hits.

Val queries against the train database by cosine on z[:m] (slice, then
L2-normalise); a neighbour matches when it has the query's label. The metrics
are `retrieval_metrics`' (AP@k divided by k, recall@k over the true per-class
database counts), renamed mAP@k since they are means of AP@k over queries.
Also reports "top1": the 1-NN accuracy, free from the same neighbours.
"""

from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator, baselines, neighbors
from mrl_jax.evaluators import retrieval_metrics

DEFAULTS = dict(neighbors.SEARCH_DEFAULTS, ks=retrieval_metrics.DEFAULT_KS)


def metric_name(key: str) -> str:
  """retrieval_metrics' "ap@k" is a mean over queries: "mAP@k"."""
  return "m" + key.replace("ap@", "AP@") if key.startswith("ap@") else key


@EVALUATORS.register("retrieval")
class RetrievalEvaluator(Evaluator):
  """Options: ks (cut-offs), dims (() → trained), features ("prefix" | "svd" | "random"),
  database_split, query_split, max_train_examples (0 → all), block_size, query_batch, seed.
  """

  DEFAULTS = DEFAULTS

  def run(self, ctx) -> EvalResult:
    o = self.options
    ks = tuple(sorted(int(k) for k in o["ks"]))
    width = ctx.embeddings(o["query_split"]).z.shape[1]
    dims = neighbors.eval_dims(o["dims"], self.trained_dims, width, "retrieval")
    data = neighbors.load(ctx, o, max(dims))
    baselines.check_single_label(data.db_labels, "retrieval")
    neighbors.check_k(ks[-1], len(data.db_labels), "retrieval", "ks")
    counts = data.class_counts(self.num_classes)
    # mAP@k first: the runner's log line shows the first metric.
    names = ([f"mAP@{k}" for k in ks] + [f"{p}@{k}" for p in ("precision", "recall")
                                         for k in ks] + [f"top{k}_hit" for k in ks] + ["top1"]
             + ["degenerate_queries", "degenerate_database"])
    metrics = {name: [] for name in names}
    for m in dims:
      misses, q_fraction, db_fraction = data.degenerate(m, self.name)
      neighbor_labels = data.db_labels[data.top_k(m, ks[-1])]
      neighbor_labels[misses] = -1  # a label no query has: a degenerate query matches nothing
      values = {metric_name(key): value for key, value in retrieval_metrics.retrieval_metrics(
          neighbor_labels, data.query_labels, counts, ks).items()}
      values["top1"] = retrieval_metrics.one_nn_accuracy(neighbor_labels, data.query_labels)
      values.update(degenerate_queries=q_fraction, degenerate_database=db_fraction)
      for name in names:
        metrics[name].append(values[name])
    return EvalResult(name=self.name, dims=list(dims), metrics=metrics,
                      extra={"database_size": len(data.db_labels),
                             # Exact search's multiply-adds per query: mAP vs cost plots.
                             "mflops": [len(data.db_labels) * m / 1e6 for m in dims],
                             "num_queries": len(data.query_labels), "features": o["features"]})
