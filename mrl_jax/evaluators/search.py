"""Exact top-k nearest neighbours by inner product or cosine, for databases of millions.

Blocking: a `lax.scan` over database blocks keeps only the running top-k, so
memory is O(Q·block + Q·k). Each block is read in place with
`lax.dynamic_slice` (rows, and the prefix columns [:m] at nesting dim m), and
a ragged last block gets its own static slice, so the database is never
padded, cast or copied whole; a float16 database is cast block by block.

Selection: `lax.top_k` over a block's scores costs about as much at 16 dims
as the matrix product does at 2048, so `select_top_k` selects in two exact
stages: split the scores into chunks of c, keep the k chunks with the largest
maxima, then take the top k of those k·c candidates. It is exact: a chunk
holding one of the top k elements ranks among the top k chunks, because every
chunk ranked above it holds a distinct element ranked above that element.

Ties resolve to the lower database index everywhere: `lax.top_k` returns the
earlier of equal elements first (XLA TopK semantics), chunk maxima tie to the
lower chunk, chosen chunks are re-sorted into index order, and the running
top-k (all indices below the current block) is concatenated before the block.

Cosine at dim m multiplies the inner products with the prefix by precomputed
inverse row norms at m, which equals the product with L2-normalised rows
without materialising a normalised copy of the database.

Degenerate vectors: a prefix that is all zero or has a non-finite entry has no
direction, so its cosine is undefined. Such database rows score the lowest
finite float32 (they rank after every valid row, among themselves by index,
and still before the -inf padding of the running top-k); such queries are
searched as the zero vector (every valid row scores 0, so they get the lowest
indices) and the evaluators count them as misses (`degenerate_rows`), so no
metric rests on an arbitrary order among zeros.
"""

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mrl_jax import sharding

_PAD_INDEX = np.iinfo(np.int32).max
_HIGHEST = jax.lax.Precision.HIGHEST
_DEGENERATE_SCORE = float(np.finfo(np.float32).min)


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalises rows; a degenerate row (all zero or non-finite) becomes zero."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.where(jnp.isfinite(norm) & (norm > 0), x / jnp.maximum(norm, eps), 0.0)


def inverse_norms(x: jax.Array) -> jax.Array:
  """1 / ‖x‖ per row, and 0 for a degenerate row (all zero or non-finite)."""
  norm = jnp.linalg.norm(jnp.asarray(x, jnp.float32), axis=-1)
  valid = jnp.isfinite(norm) & (norm > 0)
  return jnp.where(valid, 1.0 / jnp.where(valid, norm, 1.0), 0.0)


def cosine_scores(products: jax.Array, inv_norms: jax.Array) -> jax.Array:
  """Inner products with unit queries → cosines; the lowest finite float32 for
  degenerate rows (inv 0), below every cosine and above the -inf padding."""
  return jnp.where(inv_norms > 0, products * inv_norms, _DEGENERATE_SCORE)


def degenerate_rows(x, dim: int, block_rows: int = 65536) -> np.ndarray:
  """[N] bool: rows whose prefix x[:, :dim] is all zero or has a non-finite entry
  (read block by block, so a memmap is never copied whole)."""
  out = np.empty((x.shape[0],), bool)
  for start in range(0, x.shape[0], block_rows):
    block = np.asarray(x[start:start + block_rows, :dim], np.float32)
    out[start:start + len(block)] = (~np.isfinite(block).all(axis=1)
                                     | ~np.any(block != 0, axis=1))
  return out


def _chunk_size(n: int, k: int) -> int:
  """c ≈ √(n/k), a power of two, balancing the n/c maxima against the k·c candidates."""
  return 1 << max(0, round(math.log2(math.sqrt(n / k))))


def select_top_k(scores: jax.Array, k: int,
                 chunk_size: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
  """Exact top-k along the last axis: (values, positions), ties to the lower position.

  Same result as `lax.top_k` on finite scores, in two cheaper stages (see the
  module docstring); falls back to `lax.top_k` where chunking saves nothing.
  """
  n = scores.shape[-1]
  c = chunk_size or _chunk_size(n, k)
  if c < 4 or 2 * k * c > n:
    return jax.lax.top_k(scores, k)
  lead = scores.shape[:-1]
  full = n // c * c  # a ragged last chunk is reduced from a slice: no padded copy
  maxima = scores[..., :full].reshape(*lead, full // c, c).max(axis=-1)
  if full < n:
    maxima = jnp.concatenate([maxima, scores[..., full:].max(axis=-1, keepdims=True)], -1)
  _, best = jax.lax.top_k(maxima, k)
  best = jnp.sort(best, axis=-1)  # index order, so equal candidates keep it
  positions = (best[..., None] * c + jnp.arange(c, dtype=best.dtype)).reshape(*lead, k * c)
  candidates = jnp.take_along_axis(scores, jnp.minimum(positions, n - 1), axis=-1)
  candidates = jnp.where(positions < n, candidates, -jnp.inf)  # past the ragged end
  values, pos = jax.lax.top_k(candidates, k)
  return values, jnp.take_along_axis(positions, pos, axis=-1)


def _merge(best, new, k: int):
  """Top-k of the running best (lower indices, first) and a block's top-k."""
  scores = jnp.concatenate([best[0], new[0]], axis=1)
  indices = jnp.concatenate([best[1], new[1]], axis=1)
  top, pos = jax.lax.top_k(scores, k)
  return top, jnp.take_along_axis(indices, pos, axis=1)


def search_impl(queries: jax.Array, database: jax.Array, inv_norms: Optional[jax.Array],
                k: int, block_size: int, dim: int) -> Tuple[jax.Array, jax.Array]:
  """Traceable blocked top-k of `queries @ database[:, :dim].T` (times `inv_norms`)."""
  n = database.shape[0]
  block_size = min(block_size, n)
  num_full = n // block_size
  queries = queries.astype(jnp.float32)

  def block_top_k(block, inv, start):
    scores = jnp.matmul(queries, block.astype(jnp.float32).T, precision=_HIGHEST)
    if inv is not None:
      scores = cosine_scores(scores, inv[None, :])
    top, pos = select_top_k(scores, min(k, block.shape[0]))
    return top, pos.astype(jnp.int32) + start

  def step(best, b):
    start = b * block_size
    block = jax.lax.dynamic_slice(database, (start, 0), (block_size, dim))
    inv = None if inv_norms is None else jax.lax.dynamic_slice(inv_norms, (start,),
                                                               (block_size,))
    return _merge(best, block_top_k(block, inv, start), k), None

  q = queries.shape[0]
  if num_full == 1 and block_size >= k:
    best = block_top_k(database[:block_size, :dim],
                       None if inv_norms is None else inv_norms[:block_size], 0)
  else:
    init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), _PAD_INDEX, jnp.int32))
    best, _ = jax.lax.scan(step, init, jnp.arange(num_full, dtype=jnp.int32))
  start = num_full * block_size
  if start < n:  # the ragged last block
    tail_inv = None if inv_norms is None else inv_norms[start:]
    best = _merge(best, block_top_k(database[start:, :dim], tail_inv, start), k)
  return best


@functools.lru_cache(maxsize=None)
def _jitted(k: int, block_size: int, dim: int, cosine: bool):
  def fn(queries, database, inv_norms):
    if cosine:
      queries = normalize(queries[:, :dim])
    return search_impl(queries, database, inv_norms if cosine else None, k, block_size, dim)
  return jax.jit(fn)


_jit_inverse_norms = jax.jit(lambda x, m: inverse_norms(x[:, :m]), static_argnums=1)


def _check(queries, database, k: int, block_size: int, dim: int) -> None:
  if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
    raise ValueError(f"queries [Q, d] and database [N, d] must share d; got "
                     f"{queries.shape} and {database.shape}.")
  if not 1 <= k <= database.shape[0]:
    raise ValueError(f"k={k} must be in [1, N={database.shape[0]}]; lower k or "
                     "enlarge the database.")
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1.")
  if not 1 <= dim <= database.shape[1]:
    raise ValueError(f"m={dim} must be in [1, d={database.shape[1]}].")


def place(x, mesh: Optional[Mesh], batch: bool = False) -> jax.Array:
  """On the mesh: rows split over the data-parallel axes (batch) or replicated."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, sharding.batch_sharding(mesh) if batch else sharding.replicated(mesh))


def stream_queries(fn, queries, query_batch: int, mesh: Optional[Mesh]):
  """Runs `fn(query_batch_rows)` over all queries in equal batches, concatenating outputs.

  Batches are padded to one shape (one compilation) and a multiple of the
  data-parallel size, and split over the mesh; queries may live on the host.
  """
  q = queries.shape[0]
  step = min(query_batch, q)
  if mesh is not None:
    dp = sharding.data_parallel_size(mesh)
    step = -(-step // dp) * dp
  outputs = []
  for start in range(0, q, step):
    rows = queries[start:start + step]
    pad = step - rows.shape[0]
    if pad:
      rows = jnp.pad(jnp.asarray(rows), ((0, pad), (0, 0)))
    out = fn(place(rows, mesh, batch=True))
    outputs.append(jax.tree.map(lambda a: a[:a.shape[0] - pad], out) if pad else out)
  if len(outputs) == 1:
    return outputs[0]
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)


def top_k(queries, database, k: int, *, dim: Optional[int] = None, cosine: bool = False,
          block_size: int = 65536, query_batch: int = 1024,
          mesh: Optional[Mesh] = None) -> Tuple[jax.Array, jax.Array]:
  """Top-k database rows for every query: (scores [Q, k], indices [Q, k]).

  Args:
    queries, database: [Q, d] and [N, d], on the host or the devices, any float dtype.
    dim: search the prefix [:dim] (default all d).
    cosine: L2-normalise the prefixes (the MRL protocol: slice, then normalise);
      otherwise plain inner products.
    block_size: database rows scored at once (memory ∝ query_batch·block_size).
    query_batch: queries per step; all of them stream through in such batches.
    mesh: split each query batch over its data-parallel axes (database replicated).
  """
  dim = database.shape[1] if dim is None else dim
  _check(queries, database, k, block_size, dim)
  database = place(database, mesh)
  inv = _jit_inverse_norms(database, dim) if cosine else None
  fn = _jitted(k, block_size, dim, cosine)
  return stream_queries(lambda q: fn(q, database, inv), queries, query_batch, mesh)
