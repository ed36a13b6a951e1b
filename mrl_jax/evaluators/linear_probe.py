"""Linear probe: a fresh softmax classifier on frozen features, for every dim at once.

The paper's protocol (a linear classifier on frozen z[:m]) per dim m would
train M separate models. Instead one jitted step trains all of them: the
weights are a stack W [M, D, C] (D the largest dim) whose row d of probe i is
masked to zero for d ≥ m_i, so probe i sees exactly z[:m_i]; the M losses are
summed, and since the probes share no parameters and AdamW is per-coordinate,
each probe follows the trajectory it would follow alone. The cost is one
[B, D] × [D, M·C] matmul per step instead of M passes over the data.

Features are standardised per coordinate with train statistics (which commute
with taking a prefix), the weights start at zero (the problem is convex), and
AdamW follows a cosine schedule over `epochs` passes of shuffled mini-batches.
Mini-batches are split over the mesh's data axes (sharding.batch_sharding); the
small probe state is replicated. Works on the "svd" and "random" baselines too,
since those features are nested in the same way (baselines.py).
"""

import math
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from mrl_jax import mrl, sharding
from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator
from mrl_jax.evaluators import baselines

DEFAULTS = dict(epochs=10, batch_size=1024, learning_rate=0.05, weight_decay=1e-4, seed=0,
                features="prefix", max_train_examples=0, dims=())


def _dim_mask(dims: Sequence[int], width: int) -> np.ndarray:
  """[M, D] float32: 1 where coordinate d < m_i."""
  return (np.arange(width)[None, :] < np.asarray(dims)[:, None]).astype(np.float32)


def _logits(params, x, dim_mask):
  """[M, B, C] logits of every probe on a [B, D] batch."""
  x = (x - params["mean"]) / params["std"]
  weights = params["w"] * dim_mask[:, :, None]
  return jnp.einsum("bd,mdc->mbc", x, weights) + params["b"][:, None, :]


def _put(mesh: Mesh, array: np.ndarray) -> jax.Array:
  """A host batch (the same on every process) as a global array split over the batch."""
  spec = sharding.batch_sharding(mesh)
  return jax.make_array_from_callback(array.shape, spec, lambda index: array[index])


def _batches(order: np.ndarray, batch: int):
  """(rows, mask) per mini-batch; the last one padded with row 0 and mask 0.

  Rows are sorted within a batch (a memmap is then read front to back; the order
  inside a batch does not change the step).
  """
  for start in range(0, len(order), batch):
    rows = np.sort(order[start:start + batch])
    mask = np.zeros(batch, np.float32)
    mask[:len(rows)] = 1.0
    yield np.pad(rows, (0, batch - len(rows))), mask


def _batch_size(requested: int, num_rows: int, mesh: Mesh) -> int:
  """At most `requested`, no larger than needed, divisible by the data-parallel size."""
  parallel = sharding.data_parallel_size(mesh)
  size = min(requested, num_rows)
  return max(parallel, math.ceil(size / parallel) * parallel)


def train_probes(features: baselines.Features, train_rows: np.ndarray, labels: np.ndarray,
                 dims: Sequence[int], num_classes: int, mesh: Mesh, *, epochs: int,
                 batch_size: int, learning_rate: float, weight_decay: float,
                 seed: int = 0) -> Dict[str, Any]:
  """Trains one probe per dim on the train rows `train_rows`; returns the probe params.

  `labels` are the train labels of those rows, in the same order.
  """
  width, dims = max(dims), tuple(dims)
  batch = _batch_size(batch_size, len(train_rows), mesh)
  steps = epochs * math.ceil(len(train_rows) / batch)
  mean, std = _moments(features, train_rows, width)
  params = {"w": jnp.zeros((len(dims), width, num_classes)),
            "b": jnp.zeros((len(dims), num_classes))}
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, max(steps, 1)),
                   weight_decay=weight_decay)
  dim_mask = jnp.asarray(_dim_mask(dims, width))
  constants = {"mean": jnp.asarray(mean), "std": jnp.asarray(std)}

  def step(state, x, y, mask):
    def loss_fn(trainable):
      logits = _logits({**trainable, **constants}, x, dim_mask)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None, :])
      return jnp.sum(ce * mask[None, :]) / jnp.maximum(jnp.sum(mask), 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, loss

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step = jax.jit(step, in_shardings=(replicated, batched, batched, batched),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
  state = jax.device_put({"params": params, "opt": tx.init(params)}, replicated)
  rng = np.random.default_rng(seed)
  loss = jnp.nan
  for epoch in range(epochs):
    order = rng.permutation(len(train_rows))
    for positions, mask in _batches(order, batch):
      x = features.take("train", train_rows[positions], width)
      state, loss = step(state, _put(mesh, x), _put(mesh, labels[positions].astype(np.int32)),
                         _put(mesh, mask))
    if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:  # ~10 lines a run
      logging.info("linear probe: epoch %d/%d, summed loss over %d dims %.4f", epoch + 1,
                   epochs, len(dims), float(loss))
  return {**jax.device_get(state["params"]), "mean": mean, "std": std}


def _moments(features, rows, width) -> Tuple[np.ndarray, np.ndarray]:
  """Per-coordinate mean and std (float32) of the train rows, accumulated blockwise."""
  total, squares = np.zeros(width), np.zeros(width)
  for start in range(0, len(rows), 65536):
    x = features.take("train", rows[start:start + 65536], width).astype(np.float64)
    total += x.sum(0)
    squares += (x * x).sum(0)
  mean = total / len(rows)
  std = np.sqrt(np.maximum(squares / len(rows) - mean * mean, 0.0)) + 1e-6
  return mean.astype(np.float32), std.astype(np.float32)


def probe_accuracy(params: Dict[str, Any], features: baselines.Features, split: str,
                   labels: np.ndarray, dims: Sequence[int], mesh: Mesh,
                   batch_size: int = 1024) -> Dict[str, np.ndarray]:
  """{"top1", "top5"}: [M] accuracies of the probes on every row of `split`."""
  width = max(dims)
  dim_mask = jnp.asarray(_dim_mask(dims, width))

  def counts(params, x, y, mask):
    top1, top5 = mrl.topk_hits(_logits(params, x, dim_mask), y, k=5)  # [M, B] each
    return jnp.sum(top1 * mask, axis=1), jnp.sum(top5 * mask, axis=1)

  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  counts = jax.jit(counts, in_shardings=(replicated, batched, batched, batched),
                   out_shardings=replicated)
  params = jax.device_put(params, replicated)
  total = len(labels)
  batch = _batch_size(batch_size, total, mesh)
  top1, top5 = np.zeros(len(dims)), np.zeros(len(dims))
  for rows, mask in _batches(np.arange(total), batch):
    x = features.take(split, rows, width)
    c1, c5 = counts(params, _put(mesh, x), _put(mesh, labels[rows].astype(np.int32)),
                    _put(mesh, mask))
    top1, top5 = top1 + np.asarray(c1), top5 + np.asarray(c5)
  return {"top1": top1 / total, "top5": top5 / total}


@EVALUATORS.register("linear_probe")
class LinearProbeEvaluator(Evaluator):
  """Options: epochs, batch_size, learning_rate, weight_decay, seed, features
  ("prefix" | "svd" | "random"), max_train_examples (0 → all), dims (() → trained)."""

  DEFAULTS = DEFAULTS

  def __init__(self, eval_config: ml_collections.ConfigDict, *, dims: Sequence[int],
               num_classes: int):
    super().__init__(eval_config, dims=dims, num_classes=num_classes)
    self.dims = tuple(int(m) for m in (self.options["dims"] or dims))

  def run(self, ctx) -> EvalResult:
    o = self.options
    train, val = ctx.embeddings("train"), ctx.embeddings("val")
    baselines.check_single_label(train.labels, "linear_probe")
    features = baselines.Features(train.z, val.z, o["features"], o["seed"])
    rows = baselines.subsample(len(train.labels), o["max_train_examples"], o["seed"])
    params = train_probes(features, rows, np.asarray(train.labels)[rows], self.dims,
                          self.num_classes, ctx.mesh, epochs=o["epochs"],
                          batch_size=o["batch_size"], learning_rate=o["learning_rate"],
                          weight_decay=o["weight_decay"], seed=o["seed"])
    accuracy = probe_accuracy(params, features, "val", np.asarray(val.labels), self.dims,
                              ctx.mesh, o["batch_size"])
    return EvalResult(name=self.name, dims=list(self.dims),
                      metrics={key: [float(v) for v in value] for key, value in accuracy.items()},
                      extra={"features": o["features"], "train_examples": int(len(rows))})
