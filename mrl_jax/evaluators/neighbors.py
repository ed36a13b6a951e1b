"""What the neighbour evaluators (knn, retrieval, adaptive_retrieval) share.

The database is the train embeddings (optionally a random subset), the queries
the val embeddings; both go through `baselines.Features`, so the SVD and
random-selection baselines fill the same tables as the MRL prefix. The
database is put on the devices once per evaluator run and every dim slices it
there, so a 1.28M × 2048 memmap is read from disk once, not once per dim.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import baselines, search

SEARCH_DEFAULTS = dict(dims=(), features="prefix", database_split="train", query_split="val",
                       max_train_examples=0, block_size=262144, query_batch=1024, seed=0)


@dataclasses.dataclass
class Neighbors:
  """Database and queries of one evaluator run, at the features' full (largest) dim."""
  database: jax.Array       # [N, D] on the devices (replicated over the mesh)
  db_labels: np.ndarray     # [N] or [N, L]
  queries: np.ndarray       # [Q, D] on the host; streamed in query batches
  query_labels: np.ndarray  # [Q] or [Q, L]
  mesh: Any
  block_size: int
  query_batch: int

  def class_counts(self, num_classes: int) -> np.ndarray:
    """Database items per class: recall@k's denominator."""
    return np.bincount(self.db_labels, minlength=num_classes)

  def degenerate(self, m: int, evaluator: str) -> Tuple[np.ndarray, float, float]:
    """([Q] bool mask of degenerate queries at dim m, their fraction, the database's
    fraction); logs a warning when either is non-zero."""
    queries = search.degenerate_rows(self.queries, m)
    db_fraction = float(_degenerate_fraction(self.database, m))
    q_fraction = float(queries.mean()) if len(queries) else 0.0
    if q_fraction or db_fraction:
      logging.warning("%s @ d%d: %.2f%% of the queries and %.2f%% of the database rows are "
                      "all zero or non-finite; those queries count as misses and those rows "
                      "rank last.", evaluator, m, 100 * q_fraction, 100 * db_fraction)
    return queries, q_fraction, db_fraction

  def top_k(self, m: int, k: int) -> np.ndarray:
    """[Q, k] database indices of each query's k nearest rows by cosine at dim m."""
    _, indices = search.top_k(self.queries, self.database, k, dim=m, cosine=True,
                              block_size=self.block_size, query_batch=self.query_batch,
                              mesh=self.mesh)
    return np.asarray(indices)


_degenerate_fraction = jax.jit(
    lambda x, m: jnp.mean((search.inverse_norms(x[:, :m]) == 0).astype(jnp.float32)),
    static_argnums=1)


def eval_dims(option: Sequence[int], trained: Sequence[int], width: int,
              evaluator: str) -> Tuple[int, ...]:
  """The `dims` option, or the trained nesting dims when it is empty; checked against d."""
  dims = tuple(int(m) for m in (option or trained))
  bad = [m for m in dims if not 1 <= m <= width]
  if not dims or bad:
    raise ConfigError(f"The {evaluator} evaluator's dims {dims} must be non-empty and lie in "
                      f"1..{width}, the embedding width; fix its `dims` option.")
  return dims


def load(ctx, options: Dict[str, Any], max_dim: int) -> Neighbors:
  """Reads the two splits, subsets the database and places it on the mesh."""
  db = ctx.embeddings(options["database_split"])
  queries = ctx.embeddings(options["query_split"])
  rows = baselines.subsample(len(db.labels), int(options["max_train_examples"]),
                             int(options["seed"]))
  db_z = db.z if len(rows) == len(db.labels) else db.z[rows]
  if options["features"] == "prefix":  # z itself: no float32 copy of the whole split
    q_z = queries.z
  else:
    db_z, q_z = baselines.Features(db_z, queries.z, options["features"],
                                   int(options["seed"])).at_dim(max_dim)
  return Neighbors(database=search.place(db_z, ctx.mesh), db_labels=np.asarray(db.labels)[rows],
                   queries=q_z, query_labels=np.asarray(queries.labels), mesh=ctx.mesh,
                   block_size=int(options["block_size"]),
                   query_batch=int(options["query_batch"]))


def check_k(k: int, n: int, evaluator: str, option: str) -> None:
  if k > n:
    raise ConfigError(f"The {evaluator} evaluator needs {k} neighbours but the database has "
                      f"{n} rows; lower its `{option}` option or raise max_train_examples.")


def timed(search_fn: Callable[[np.ndarray], Any], queries: np.ndarray,
          query_batch: int) -> Tuple[Any, float]:
  """(search_fn(queries), queries/s), compiled first on one batch so the time is search."""
  jax.block_until_ready(search_fn(queries[:query_batch]))
  start = time.perf_counter()
  result = jax.block_until_ready(search_fn(queries))
  return result, len(queries) / (time.perf_counter() - start)
