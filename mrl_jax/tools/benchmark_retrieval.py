"""Exact full-dim search vs adaptive vs funnel retrieval on a synthetic MRL-like database.

Measures queries/s (median of --repeats timed runs after a warm-up, so
compilation is excluded, each ended by jax.block_until_ready), MFLOPs
(multiply-adds) per query, overlap of each method's top-k with exact full-dim
search, and class-label mAP@k / top-1, in one run; prints the device and
versions with the figures as one JSON line.

The data mimic MRL embeddings: class centroids plus noise, both scaled by
(i + 1)^-decay along dim i, so the leading dims carry most of the
information and a 16-dim shortlist is meaningful.

  python -m mrl_jax.tools.benchmark_retrieval                  # 1M × 2048, 10K queries
  python -m mrl_jax.tools.benchmark_retrieval --db_size=100000 --num_queries=1000  # CPU
"""

import json
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from mrl_jax import cli, sharding
from mrl_jax.evaluators import retrieval_metrics, search, shortlist

FLAGS = flags.FLAGS
flags.DEFINE_integer("db_size", 1_000_000, "Database rows N.")
flags.DEFINE_integer("num_queries", 10_000, "Queries.")
flags.DEFINE_integer("dim", 2048, "Embedding width d (full-dim exact search uses all of it).")
flags.DEFINE_integer("num_classes", 1000, "Synthetic classes.")
flags.DEFINE_float("decay", 1.0, "Per-dim scale (i + 1)^-decay of centroids and noise.")
flags.DEFINE_float("noise", 1.0, "Within-class noise std relative to the centroid spread.")
flags.DEFINE_enum("db_dtype", "float32", ["float32", "float16", "bfloat16"],
                  "Database storage dtype (scores are computed in float32 either way).")
flags.DEFINE_integer("k", 10, "Results compared with exact search (overlap@k, mAP@k).")
flags.DEFINE_integer("shortlist_dim", 16, "Adaptive retrieval: shortlist dim D_s.")
flags.DEFINE_integer("shortlist_k", 200, "Adaptive retrieval: shortlist size K.")
flags.DEFINE_list("funnel_dims", ["16", "32", "64", "128", "256", "2048"], "Funnel dims.")
flags.DEFINE_list("funnel_ks", ["200", "100", "50", "25", "10"], "Funnel shortlist sizes.")
flags.DEFINE_integer("block_size", 1 << 20, "Database rows scored at once (GPU: one block).")
flags.DEFINE_integer("query_batch", 1024, "Queries per step.")
flags.DEFINE_integer("repeats", 3, "Timed runs per method (the median is reported).")
flags.DEFINE_integer("seed", 0, "Data seed.")


@jax.jit
def _embed(key, labels, centroids, scale, noise):
  z = centroids[labels] + noise * jax.random.normal(key, (labels.shape[0], scale.shape[0]))
  return z * scale


def make_data(n: int, q: int, d: int, num_classes: int, decay: float, noise: float,
              seed: int):
  """(database [n, d], db labels, queries [q, d], query labels), generated on the device."""
  keys = jax.random.split(jax.random.key(seed), 5)
  scale = (1.0 + jnp.arange(d, dtype=jnp.float32)) ** -decay
  centroids = jax.random.normal(keys[0], (num_classes, d))
  db_labels = jax.random.randint(keys[1], (n,), 0, num_classes)
  q_labels = jax.random.randint(keys[2], (q,), 0, num_classes)
  database = _embed(keys[3], db_labels, centroids, scale, noise)
  queries = _embed(keys[4], q_labels, centroids, scale, noise)
  return database, np.asarray(db_labels), queries, np.asarray(q_labels)


def _time(fn, repeats: int):
  """(result, median seconds) of fn() after one untimed warm-up call."""
  result = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return result, statistics.median(times)


def _selection_ms(n: int, k: int, query_batch: int, repeats: int):
  """lax.top_k vs the two-stage `select_top_k` on one [query_batch, n] score matrix."""
  scores = jax.random.normal(jax.random.key(1), (query_batch, n))
  out = {}
  for name, fn in (("lax_top_k", jax.jit(lambda s: jax.lax.top_k(s, k))),
                   ("two_stage", jax.jit(lambda s: search.select_top_k(s, k)))):
    _, seconds = _time(lambda fn=fn: fn(scores), repeats)
    out[name] = round(1000 * seconds, 2)
  return out


def benchmark() -> dict:
  n, q, d, k = FLAGS.db_size, FLAGS.num_queries, FLAGS.dim, FLAGS.k
  database, db_labels, queries, q_labels = make_data(
      n, q, d, FLAGS.num_classes, FLAGS.decay, FLAGS.noise, FLAGS.seed)
  database = database.astype(FLAGS.db_dtype)  # float16 halves the rerank gathers' bytes
  counts = np.bincount(db_labels, minlength=FLAGS.num_classes)
  # Queries are split over all devices; the database is replicated.
  opts = dict(block_size=FLAGS.block_size, query_batch=FLAGS.query_batch,
              mesh=sharding.make_mesh({"data": -1}))
  funnel_dims = tuple(int(x) for x in FLAGS.funnel_dims)
  funnel_ks = tuple(int(x) for x in FLAGS.funnel_ks)
  methods = {
      f"exact@{d}": (lambda: search.top_k(queries, database, k, cosine=True, **opts), n * d),
      f"adaptive {FLAGS.shortlist_dim}->{d} K={FLAGS.shortlist_k}": (
          lambda: shortlist.funnel_top_k(queries, database, (FLAGS.shortlist_dim, d),
                                         (FLAGS.shortlist_k,), **opts),
          shortlist.funnel_macs(n, (FLAGS.shortlist_dim, d), (FLAGS.shortlist_k,))),
      "funnel " + "->".join(map(str, funnel_dims)): (
          lambda: shortlist.funnel_top_k(queries, database, funnel_dims, funnel_ks, **opts),
          shortlist.funnel_macs(n, funnel_dims, funnel_ks)),
  }
  results, exact = {}, None
  for name, (fn, macs) in methods.items():
    (_, indices), seconds = _time(fn, FLAGS.repeats)
    indices = np.asarray(indices)[:, :k]
    exact = indices if exact is None else exact
    labels = db_labels[indices]
    results[name] = {
        "queries_per_sec": round(q / seconds, 1), "seconds": round(seconds, 4),
        "mflops_per_query": macs / 1e6,
        f"overlap_with_exact@{k}": round(shortlist.overlap(indices, exact, k), 4),
        f"mAP@{k}": round(retrieval_metrics.retrieval_metrics(
            labels, q_labels, counts, (k,))[f"ap@{k}"], 4),
        "top1": round(retrieval_metrics.one_nn_accuracy(labels, q_labels), 4)}
    logging.info("%s: %s", name, results[name])
  exact_qps = results[f"exact@{d}"]["queries_per_sec"]
  for r in results.values():
    r["speedup_vs_exact"] = round(r["queries_per_sec"] / exact_qps, 2)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"device": f"{jax.device_count()} x {device.device_kind}",
          "jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
          "db_size": n, "num_queries": q, "dim": d, "db_dtype": FLAGS.db_dtype, "k": k,
          "decay": FLAGS.decay, "noise": FLAGS.noise, "block_size": FLAGS.block_size,
          "query_batch": FLAGS.query_batch, "repeats": FLAGS.repeats,
          "peak_device_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None,
          "selection_ms": _selection_ms(min(n, FLAGS.block_size), FLAGS.shortlist_k,
                                        min(q, FLAGS.query_batch), FLAGS.repeats),
          "methods": results}


def main(argv):
  del argv
  print(json.dumps(benchmark()), flush=True)


if __name__ == "__main__":
  cli.run(main)
