"""Adaptive and funnel retrieval (MRL.md): accuracy, mAP, MFLOPs/query and measured queries/s.

Adaptive: shortlist K = `shortlist_k` rows at D_s = `shortlist_dim` over the
whole train database, rerank them at D_r = `rerank_dim` (0 → the full width).
Funnel: `funnel_dims` with shortlists `funnel_ks` (() → the paper's
16→32→64→128→256→d with 200→100→50→25→10, trimmed to the width). Both are
compared with exact search at their final dim: overlap of the top-k results,
class-label mAP@k and top-1 (the first result's label). MFLOPs count
multiply-adds per query (`shortlist.funnel_macs`), as the paper's tables do.

Per-dim metrics sweep the shortlist dim D_s over `dims` (() → the trained
nesting dims below D_r) at fixed D_r and K: the paper's adaptive-retrieval
curve. Queries/s are measured on the devices after a compiling warm-up batch.
"""

from typing import Dict, Tuple

import jax
import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator, baselines, neighbors
from mrl_jax.evaluators import retrieval_metrics, search, shortlist

PAPER_FUNNEL_DIMS = (16, 32, 64, 128, 256)  # then the full width
PAPER_FUNNEL_KS = (200, 100, 50, 25, 10)
DEFAULTS = dict(neighbors.SEARCH_DEFAULTS, ks=(10,), shortlist_dim=16, rerank_dim=0,
                shortlist_k=200, funnel_dims=(), funnel_ks=())


def default_funnel(width: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """The paper's funnel for a width d: its dims below d, then d; its last K kept."""
  dims = tuple(m for m in PAPER_FUNNEL_DIMS if m < width) + (width,)
  stages = len(dims) - 1
  if not stages:
    raise ConfigError(f"The paper's funnel has no stage below the width d={width}; set the "
                      "adaptive_retrieval options funnel_dims and funnel_ks.")
  return dims, PAPER_FUNNEL_KS[:stages - 1] + PAPER_FUNNEL_KS[-1:]


@EVALUATORS.register("adaptive_retrieval")
class AdaptiveRetrievalEvaluator(Evaluator):
  """Options: ks (cut-offs of mAP@k and overlap@k), shortlist_dim, rerank_dim, shortlist_k,
  funnel_dims, funnel_ks, dims (shortlist dims swept), features, database_split,
  query_split, max_train_examples, block_size, query_batch, seed.

  extra["exact" | "adaptive" | "funnel"] each hold mflops_per_query,
  queries_per_sec, mAP@k, top1 and overlap_with_exact@k (plus their dims and
  ks); extra["mflops"] and extra["queries_per_sec"] are the per-dim sweep's.
  """

  DEFAULTS = DEFAULTS

  def run(self, ctx) -> EvalResult:
    o = self.options
    ks = tuple(sorted(int(k) for k in o["ks"]))
    width = ctx.embeddings(o["query_split"]).z.shape[1]
    rerank_dim = int(o["rerank_dim"]) or width
    sweep = neighbors.eval_dims(
        o["dims"] or [m for m in self.trained_dims if m < rerank_dim] or [o["shortlist_dim"]],
        (), rerank_dim, "adaptive_retrieval")
    funnel_dims = tuple(int(m) for m in o["funnel_dims"])
    funnel_ks = tuple(int(k) for k in o["funnel_ks"])
    if not funnel_dims or not funnel_ks:
      default_dims, default_ks = default_funnel(width)
      funnel_dims, funnel_ks = funnel_dims or default_dims, funnel_ks or default_ks
    data = neighbors.load(ctx, o, width)
    baselines.check_single_label(data.db_labels, "adaptive_retrieval")
    n = len(data.db_labels)
    neighbors.check_k(int(o["shortlist_k"]), n, "adaptive_retrieval", "shortlist_k")
    for final, option in ((int(o["shortlist_k"]), "shortlist_k"), (funnel_ks[-1], "funnel_ks")):
      if final < ks[-1]:
        raise ConfigError(
            f"adaptive_retrieval: {option} keeps {final} results but ks needs {ks[-1]}; "
            f"raise {option} or lower ks.")
    counts = data.class_counts(self.num_classes)
    exact: Dict[int, np.ndarray] = {}

    def run_search(fn, macs: int, final_dim: int) -> dict:
      (_, indices), qps = neighbors.timed(fn, data.queries, data.query_batch)
      indices = np.asarray(indices)[:, :ks[-1]]
      exact.setdefault(final_dim, indices)  # the exact search runs first at each dim
      labels = data.db_labels[indices]
      metrics = retrieval_metrics.retrieval_metrics(labels, data.query_labels, counts, ks)
      out = {"mflops_per_query": macs / 1e6, "queries_per_sec": qps,
             "top1": retrieval_metrics.one_nn_accuracy(labels, data.query_labels)}
      for k in ks:
        out[f"mAP@{k}"] = metrics[f"ap@{k}"]
        out[f"overlap_with_exact@{k}"] = shortlist.overlap(indices, exact[final_dim], k)
      return out

    def exact_search(dim: int) -> dict:
      return dict(run_search(lambda q: search.top_k(
          q, data.database, ks[-1], dim=dim, cosine=True, block_size=data.block_size,
          query_batch=data.query_batch, mesh=data.mesh), n * dim, dim), dim=dim)

    def funnel(dims, fks) -> dict:
      return dict(run_search(lambda q: shortlist.funnel_top_k(
          q, data.database, dims, fks, block_size=data.block_size,
          query_batch=data.query_batch, mesh=data.mesh),
          shortlist.funnel_macs(n, dims, fks), dims[-1]), dims=list(dims), ks=list(fks))

    extra = {"exact": exact_search(rerank_dim)}
    if funnel_dims[-1] != rerank_dim:
      extra[f"exact@{funnel_dims[-1]}"] = exact_search(funnel_dims[-1])
    runs = {m: funnel((m, rerank_dim), (int(o["shortlist_k"]),))
            for m in sorted(set(sweep) | {int(o["shortlist_dim"])})}
    extra["adaptive"] = runs[int(o["shortlist_dim"])]
    extra["funnel"] = funnel(funnel_dims, funnel_ks)
    names = [f"mAP@{k}" for k in ks] + ["top1"] + [f"overlap_with_exact@{k}" for k in ks]
    metrics = {name: [runs[m][name] for m in sweep] for name in names}
    extra["mflops"] = [runs[m]["mflops_per_query"] for m in sweep]  # the quality-vs-cost plot
    extra["queries_per_sec"] = [runs[m]["queries_per_sec"] for m in sweep]
    extra.update(rerank_dim=rerank_dim, shortlist_k=int(o["shortlist_k"]), database_size=n,
                 num_queries=len(data.query_labels), flops="multiply-adds per query",
                 device=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    return EvalResult(name=self.name, dims=list(sweep), metrics=metrics, extra=extra)
