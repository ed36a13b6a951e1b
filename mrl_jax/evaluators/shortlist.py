"""Adaptive and funnel retrieval: a cheap low-dim shortlist, reranked at higher dims.

Funnel with dims (d_0, …, d_S) and shortlist sizes (K_0, …, K_{S-1}): search
the whole database at d_0 for K_0 candidates (blocked, exact, `search`), then
at each later stage s rerank the current shortlist at d_s and keep K_s; the
last stage reorders the final shortlist of K_{S-1} at d_S. Adaptive retrieval
is the two-stage funnel (D_s, D_r) with (K,). Every stage uses cosine on the
prefix (slice, then L2-normalise), as the MRL protocol does.

Reranking gathers only the K shortlisted rows' prefixes [:d_s] from the raw
database (K·d_s values per query), so no normalised copy of the full database
exists; the d_0 shortlist index (N·d_0 values, normalised) is built once.

Cost is counted in multiply-adds (MACs) per query, as the MRL paper's "FLOPs"
do (e.g. exact search at 2048 over 1.28M rows = 2621 MFLOPs):
N·d_0 + Σ_{s≥1} K_{s-1}·d_s. Normalisation and top-k selection are not counted.
"""

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import search


def check_funnel(dims: Sequence[int], ks: Sequence[int], n: int, d: int) -> None:
  """Funnel shape rules (config options), with the fix in each message."""
  if len(dims) < 2 or len(ks) != len(dims) - 1:
    raise ConfigError(f"A funnel needs dims (d_0, …, d_S) with S >= 1 and one shortlist "
                     f"size per stage but the last: len(ks) = len(dims) - 1; got dims="
                     f"{tuple(dims)}, ks={tuple(ks)}.")
  if any(not 1 <= m <= d for m in dims):
    raise ConfigError(f"Funnel dims {tuple(dims)} must lie in [1, d={d}].")
  if ks[0] > n or any(b > a for a, b in zip(ks, ks[1:])) or min(ks) < 1:
    raise ConfigError(f"Funnel shortlists {tuple(ks)} must shrink (non-increasing), be >= 1 "
                     f"and start at most at the database size N={n}.")


def funnel_macs(n: int, dims: Sequence[int], ks: Sequence[int]) -> int:
  """Multiply-adds per query: N·d_0 for the shortlist, then K_{s-1}·d_s per rerank."""
  return n * dims[0] + sum(k * m for k, m in zip(ks, dims[1:]))


def overlap(indices, reference, k: int) -> float:
  """Mean over queries of |top-k ∩ reference top-k| / k (agreement with exact search)."""
  a, b = np.asarray(indices)[:, :k], np.asarray(reference)[:, :k]
  return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def rerank(queries: jax.Array, database: jax.Array, indices: jax.Array, dim: int,
           keep: int) -> Tuple[jax.Array, jax.Array]:
  """Cosine at `dim` of each query with its shortlisted rows; the best `keep` of them.

  Shortlists are re-sorted by database index first, so equal scores keep the
  lower index, as in exact search.
  """
  indices = jnp.sort(indices, axis=1)
  rows = database[indices, :dim].astype(jnp.float32)  # gathers [Q, K, dim]
  q = search.normalize(queries[:, :dim])
  scores = jnp.einsum("qd,qkd->qk", q, rows, precision=jax.lax.Precision.HIGHEST)
  scores = search.cosine_scores(scores, search.inverse_norms(rows))
  top, pos = jax.lax.top_k(scores, keep)
  return top, jnp.take_along_axis(indices, pos, axis=1)


@functools.lru_cache(maxsize=None)
def _jitted(dims: Tuple[int, ...], ks: Tuple[int, ...], block_size: int):
  def fn(queries, database, shortlist_db):
    q0 = search.normalize(queries[:, :dims[0]])
    scores, indices = search.search_impl(q0, shortlist_db, None, ks[0], block_size, dims[0])
    for dim, keep in zip(dims[1:], ks[1:] + ks[-1:]):
      scores, indices = rerank(queries, database, indices, dim, keep)
    return scores, indices
  return jax.jit(fn)


_shortlist_index = jax.jit(lambda x, m: search.normalize(x[:, :m]), static_argnums=1)


def funnel_top_k(queries, database, dims: Sequence[int], ks: Sequence[int], *,
                 block_size: int = 65536, query_batch: int = 1024,
                 mesh: Optional[Mesh] = None) -> Tuple[jax.Array, jax.Array]:
  """Funnel retrieval: (scores at dims[-1] [Q, ks[-1]], database indices [Q, ks[-1]]).

  Args:
    queries, database: [Q, d] and [N, d] raw embeddings (host or device, any float dtype).
    dims: (d_0, …, d_S), the dim of each stage; adaptive retrieval is (D_s, D_r).
    ks: (K_0, …, K_{S-1}), the shortlist kept after each stage but the last.
    block_size, query_batch, mesh: as in `search.top_k`.
  """
  dims, ks = tuple(int(m) for m in dims), tuple(int(k) for k in ks)
  check_funnel(dims, ks, database.shape[0], database.shape[1])
  database = search.place(database, mesh)
  shortlist_db = _shortlist_index(database, dims[0])
  fn = _jitted(dims, ks, block_size)
  return search.stream_queries(lambda q: fn(q, database, shortlist_db), queries,
                               query_batch, mesh)
