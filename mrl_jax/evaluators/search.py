"""Exact top-k nearest neighbours by inner product, blocked over the database.

Memory is O(Q·block + Q·k): a `lax.scan` over database blocks keeps only the
running top-k. Ties resolve to the lower database index: the running top-k
(all indices below the current block, already tie-ordered) is concatenated
before the block (indices ascending), and `lax.top_k` returns the earlier of
equal elements first (XLA TopK semantics), so concatenation order, and with it
database order, is kept among equal scores. Padding rows score -inf and sit
last, so with k <= N they are never returned.
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mrl_jax import sharding

_PAD_INDEX = np.iinfo(np.int32).max


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalises rows; a zero row stays zero instead of becoming NaN."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def _check(queries, database, k: int, block_size: int) -> None:
  if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
    raise ValueError(f"queries [Q, d] and database [N, d] must share d; got "
                     f"{queries.shape} and {database.shape}.")
  if not 1 <= k <= database.shape[0]:
    raise ValueError(f"k={k} must be in [1, N={database.shape[0]}]; lower k or "
                     "enlarge the database.")
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1.")


def _top_k_impl(queries: jax.Array, database: jax.Array, k: int,
                block_size: int) -> Tuple[jax.Array, jax.Array]:
  """Traceable body of `blocked_top_k` (shapes are static)."""
  n, d = database.shape
  block_size = min(block_size, n)
  num_blocks = -(-n // block_size)
  pad = num_blocks * block_size - n
  database = jnp.pad(database.astype(jnp.float32), ((0, pad), (0, 0)))
  blocks = database.reshape(num_blocks, block_size, d)
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  queries = queries.astype(jnp.float32)
  q = queries.shape[0]

  def step(carry, xs):
    best_scores, best_idx = carry
    block, start = xs
    scores = jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)
    idx = start + jnp.arange(block_size, dtype=jnp.int32)
    valid = idx < n
    scores = jnp.where(valid[None, :], scores, -jnp.inf)
    idx = jnp.broadcast_to(jnp.where(valid, idx, _PAD_INDEX)[None, :], scores.shape)
    all_scores = jnp.concatenate([best_scores, scores], axis=1)  # earlier indices first
    all_idx = jnp.concatenate([best_idx, idx], axis=1)
    top_scores, pos = jax.lax.top_k(all_scores, k)
    return (top_scores, jnp.take_along_axis(all_idx, pos, axis=1)), None

  init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), _PAD_INDEX, jnp.int32))
  (scores, indices), _ = jax.lax.scan(step, init, (blocks, starts))
  return scores, indices


_jit_top_k = jax.jit(_top_k_impl, static_argnames=("k", "block_size"))


def blocked_top_k(queries: jax.Array, database: jax.Array, k: int,
                  block_size: int) -> Tuple[jax.Array, jax.Array]:
  """Top-k database rows by inner product: (scores [Q, k], indices [Q, k]).

  Pass L2-normalised vectors for cosine similarity (see `search_at_dim`).
  """
  _check(queries, database, k, block_size)
  return _jit_top_k(queries, database, k=k, block_size=block_size)


@functools.lru_cache(maxsize=None)
def _sharded_fn(mesh: Mesh, k: int, block_size: int):
  batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(functools.partial(_top_k_impl, k=k, block_size=block_size),
                 in_shardings=(batch, rep), out_shardings=(batch, batch))


def sharded_top_k(queries: jax.Array, database: jax.Array, k: int, block_size: int,
                  mesh: Mesh) -> Tuple[jax.Array, jax.Array]:
  """`blocked_top_k` with queries split over ('data', 'fsdp') and the database replicated.

  Queries are zero-padded to a multiple of the data-parallel size, and the
  padding dropped from the result, so any query count works.
  """
  _check(queries, database, k, block_size)
  q = queries.shape[0]
  pad = -q % sharding.data_parallel_size(mesh)
  if pad:
    queries = jnp.pad(jnp.asarray(queries), ((0, pad), (0, 0)))
  scores, indices = _sharded_fn(mesh, k, block_size)(queries, database)
  return (scores[:q], indices[:q]) if pad else (scores, indices)


def search_at_dim(queries: jax.Array, database: jax.Array, m: int, k: int,
                  block_size: int) -> Tuple[jax.Array, jax.Array]:
  """Cosine top-k at nesting dim m: slice to the first m dims, then L2-normalise.

  The order matters: normalising the full vector first would not give the
  prefix unit norm, so scores at m would not be cosines.
  """
  if not 1 <= m <= queries.shape[-1]:
    raise ValueError(f"m={m} must be in [1, d={queries.shape[-1]}].")
  return blocked_top_k(normalize(queries[:, :m]), normalize(database[:, :m]), k, block_size)
