"""Two-stage selection, streamed/sharded cosine search and the funnel, against numpy."""

import json

import numpy as np
import pytest

from mrl_jax import sharding
from mrl_jax.evaluators import search, shortlist
from tests import cli_runner


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_top_k(scores, k):
  """Largest first; stable argsort keeps the lower index among equal scores."""
  idx = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(scores, idx, axis=-1), idx


@pytest.mark.parametrize("n,k,chunk", [(1000, 10, 8), (1000, 10, 32), (997, 3, 16),
                                       (1000, 37, 4), (4096, 1, 64), (50, 5, None)])
def test_select_top_k_matches_argsort_with_ties(n, k, chunk):
  rng = np.random.default_rng(n + k)
  # Few distinct values: many ties, inside and across chunks.
  scores = rng.integers(-20, 20, size=(2, 3, n)).astype(np.float32)
  values, pos = search.select_top_k(scores, k, chunk)
  want_values, want_pos = _numpy_top_k(scores, k)
  np.testing.assert_array_equal(np.asarray(pos), want_pos)
  np.testing.assert_array_equal(np.asarray(values), want_values)


@pytest.mark.parametrize("block_size,query_batch", [(64, 5), (100, 32), (1000, 7)])
def test_cosine_top_k_streams_queries_and_blocks(block_size, query_batch):
  rng = np.random.default_rng(block_size)
  queries = rng.normal(size=(23, 32)).astype(np.float32)
  database = rng.normal(size=(517, 32)).astype(np.float16)  # cast block by block
  for m in (4, 32):
    want = _numpy_top_k(_unit(queries[:, :m]) @ _unit(database[:, :m]).T, 50)
    scores, idx = search.top_k(queries, database, 50, dim=m, cosine=True,
                               block_size=block_size, query_batch=query_batch)
    np.testing.assert_array_equal(np.asarray(idx), want[1])
    np.testing.assert_allclose(np.asarray(scores), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_shape,block_size", [({"data": 8, "fsdp": 1, "model": 1}, 128),
                                                   ({"data": 2, "fsdp": 2, "model": 2}, 32)])
def test_sharded_streamed_top_k_with_ties(mesh_shape, block_size):
  """The one sharded top-k test (tests/test_retrieval.py: the blocked search on one
  device); block_size 32 < k = 40: the top-k is merged across blocks."""
  mesh = sharding.make_mesh(mesh_shape)
  rng = np.random.default_rng(5)
  base = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)
  database = np.concatenate([base, base[::-1], base[:77]])  # every score tied, across blocks
  queries = rng.integers(-2, 3, size=(19, 6)).astype(np.float32)
  want_scores, want_idx = _numpy_top_k(queries.astype(np.float64) @ database.T, 40)
  # One batch of 16 queries (a multiple of the data-parallel size): split over the mesh.
  scores, idx = search.top_k(queries[:16], database, 40, block_size=block_size, mesh=mesh)
  assert idx.sharding.spec == sharding.batch_sharding(mesh).spec
  np.testing.assert_array_equal(np.asarray(idx), want_idx[:16])
  np.testing.assert_array_equal(np.asarray(scores), want_scores[:16])
  # Streamed in batches of 6 (rounded up to the data-parallel size); 19 queries leave a
  # last batch that is padded internally and trimmed.
  scores, idx = search.top_k(queries, database, 40, block_size=block_size, query_batch=6,
                             mesh=mesh)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(scores), want_scores)


def _numpy_funnel(queries, database, dims, ks):
  """Plain per-query reference of the funnel."""
  first = _unit(queries[:, :dims[0]]) @ _unit(database[:, :dims[0]]).T
  shortlists = _numpy_top_k(first, ks[0])[1]
  out_idx, out_scores = [], []
  for q, short in zip(queries, shortlists):
    for m, keep in zip(dims[1:], list(ks[1:]) + [ks[-1]]):
      short = np.sort(short)
      scores = _unit(database[short, :m]) @ _unit(q[:m])
      order = np.argsort(-scores, kind="stable")[:keep]
      short, best = short[order], scores[order]
    out_idx.append(short)
    out_scores.append(best)
  return np.array(out_scores), np.array(out_idx)


@pytest.mark.parametrize("dims,ks", [((4, 8, 16, 64), (60, 30, 12)), ((8, 64), (40,))])
def test_funnel_matches_numpy_reference(dims, ks):
  rng = np.random.default_rng(len(dims))
  # Decaying scales: the leading dims carry most of the signal, as in MRL.
  scale = 1.0 / np.arange(1, 65)
  database = (rng.normal(size=(400, 64)) * scale).astype(np.float32)
  queries = (rng.normal(size=(21, 64)) * scale).astype(np.float32)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  scores, idx = shortlist.funnel_top_k(queries, database, dims, ks, block_size=96,
                                       query_batch=8, mesh=mesh)
  want_scores, want_idx = _numpy_funnel(queries, database, dims, ks)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)


def test_adaptive_with_equal_dims_is_exact_search():
  rng = np.random.default_rng(7)
  database = rng.normal(size=(300, 24)).astype(np.float32)
  queries = rng.normal(size=(17, 24)).astype(np.float32)
  exact_scores, exact_idx = search.top_k(queries, database, 30, dim=16, cosine=True,
                                         block_size=64)
  scores, idx = shortlist.funnel_top_k(queries, database, (16, 16), (30,), block_size=64)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(exact_idx))
  np.testing.assert_allclose(np.asarray(scores), np.asarray(exact_scores), rtol=1e-6)


def test_funnel_macs_hand_checked():
  # Adaptive 16 → 2048 with K = 200 over ImageNet-1K train: N·16 + 200·2048.
  assert shortlist.funnel_macs(1_281_167, (16, 2048), (200,)) == 20_498_672 + 409_600
  # The paper's funnel: 16·N + 200·32 + 100·64 + 50·128 + 25·256 + 10·2048.
  assert shortlist.funnel_macs(1000, (16, 32, 64, 128, 256, 2048), (200, 100, 50, 25, 10)) == (
      16_000 + 6_400 + 6_400 + 6_400 + 6_400 + 20_480)


def test_funnel_rejects_bad_shapes():
  db = np.zeros((50, 8), np.float32)
  with pytest.raises(ValueError, match="len\\(ks\\) = len\\(dims\\) - 1"):
    shortlist.funnel_top_k(db, db, (4, 8), (10, 5))
  with pytest.raises(ValueError, match="must shrink"):
    shortlist.funnel_top_k(db, db, (2, 4, 8), (10, 20))
  with pytest.raises(ValueError, match="in \\[1, d=8\\]"):
    shortlist.funnel_top_k(db, db, (4, 16), (10,))


@pytest.mark.e2e
def test_benchmark_cli_prints_one_json_line():
  out = cli_runner.run_module(
      "mrl_jax.tools.benchmark_retrieval", "--db_size=3000", "--num_queries=40", "--dim=64",
      "--num_classes=20", "--funnel_dims=8,16,32,64", "--funnel_ks=100,40,10",
      "--shortlist_dim=8", "--shortlist_k=100", "--repeats=1", "--query_batch=16",
      "--block_size=1024", devices=8, fast_compile=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["device"].startswith("8 x ") and result["db_size"] == 3000
  methods = result["methods"]
  assert list(methods) == ["exact@64", "adaptive 8->64 K=100", "funnel 8->16->32->64"]
  assert methods["exact@64"]["overlap_with_exact@10"] == 1.0
  assert methods["exact@64"]["mflops_per_query"] == 3000 * 64 / 1e6
  assert methods["adaptive 8->64 K=100"]["mflops_per_query"] == (3000 * 8 + 100 * 64) / 1e6
  for m in methods.values():
    assert m["queries_per_sec"] > 0 and 0.5 <= m["overlap_with_exact@10"] <= 1.0
