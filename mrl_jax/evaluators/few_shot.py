"""n-shot linear classification on frozen prefixes, in the style of big_vision's fewshot_lsr.

For each seed and n, n train examples per class are drawn (a fixed permutation
of each class per seed, its first n, as big_vision does; a class with fewer
examples gives all it has). On that shot set, per dim m, a closed-form
L2-regularised least-squares classifier is fitted exactly as in big_vision:
features standardised with the shot set's per-coordinate mean and std, a
constant feature of 100 appended as a nearly unregularised bias, targets
2·one_hot − 1, W = (XᵀX + λI)⁻¹ XᵀY, prediction argmax(x W), λ = `l2_reg`
(big_vision's configs use 2**10).

All dims are solved in one compiled call: coordinates ≥ m are zeroed after
standardisation, which makes XᵀX + λI block-diagonal, so the solution's first m
rows equal the m-dim problem's and the rest are zero. When the shot set is
smaller than the width, the dual form Xᵀ(XXᵀ + λI)⁻¹Y (equal by the push-through
identity) keeps the solve at the shot-set size. Matmuls run at full float32
precision (no TF32), since the bias column makes the Gram matrix badly scaled.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator
from mrl_jax.evaluators import baselines

BIAS_CONSTANT = 100.0
DEFAULTS = dict(shots=(1, 5, 10, 25), num_seeds=3, l2_reg=2.0 ** 10, features="prefix",
                dims=(), batch_size=8192, max_train_examples=0, seed=0)
_HIGHEST = jax.lax.Precision.HIGHEST


def _standardise(x, mean, std, keep):
  """(x − mean)/std with coordinates ≥ m zeroed (keep [D]) and the bias column appended."""
  x = (x - mean) / std * keep
  return jnp.concatenate([x, jnp.full((x.shape[0], 1), BIAS_CONSTANT, x.dtype)], axis=1)


@jax.jit
def _fit(x, y_one_hot, dim_mask, l2_reg):
  """[M, D+1, C] least-squares weights, one per row of dim_mask [M, D]; and the moments."""
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0) + 1e-5
  targets = 2.0 * y_one_hot - 1.0

  def one(keep):
    a = _standardise(x, mean, std, keep)
    n, d = a.shape
    if n >= d:
      gram = jnp.matmul(a.T, a, precision=_HIGHEST) + l2_reg * jnp.eye(d)
      return jnp.linalg.solve(gram, jnp.matmul(a.T, targets, precision=_HIGHEST))
    gram = jnp.matmul(a, a.T, precision=_HIGHEST) + l2_reg * jnp.eye(n)
    return jnp.matmul(a.T, jnp.linalg.solve(gram, targets), precision=_HIGHEST)

  return jax.vmap(one)(dim_mask), mean, std


@jax.jit
def _correct(weights, mean, std, dim_mask, x, labels, valid):
  """[M] numbers of correctly classified rows of a test block (valid marks real rows)."""
  def one(w, keep):
    scores = jnp.matmul(_standardise(x, mean, std, keep), w, precision=_HIGHEST)
    return jnp.sum((jnp.argmax(scores, axis=1) == labels) * valid)
  return jax.vmap(one)(weights, dim_mask)


def shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """Rows of the first `shots` examples of every class after a per-seed permutation."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  return np.concatenate([rows[:shots] for rows in per_class])


def fewshot_accuracy(features: baselines.Features, train_labels: np.ndarray,
                     val_labels: np.ndarray, dims: Sequence[int], num_classes: int, *,
                     shots: int, seed: int, l2_reg: float,
                     batch_size: int = 8192) -> np.ndarray:
  """[M] val accuracies of the `shots`-shot classifiers (one draw, `seed`) at each dim."""
  width = max(dims)
  dim_mask = jnp.asarray(np.arange(width)[None, :] < np.asarray(dims)[:, None], jnp.float32)
  rows = shot_indices(train_labels, num_classes, shots, seed)
  x = features.take("train", np.sort(rows), width)
  y = np.eye(num_classes, dtype=np.float32)[train_labels[np.sort(rows)]]
  weights, mean, std = _fit(jnp.asarray(x), jnp.asarray(y), dim_mask, jnp.float32(l2_reg))
  correct = np.zeros(len(dims))
  for start in range(0, len(val_labels), batch_size):
    block = np.arange(start, min(start + batch_size, len(val_labels)))
    valid = np.zeros(batch_size, np.float32)
    valid[:len(block)] = 1.0
    padded = np.pad(block, (0, batch_size - len(block)))  # One shape → one compilation.
    correct += np.asarray(_correct(weights, mean, std, dim_mask,
                                   jnp.asarray(features.take("val", padded, width)),
                                   jnp.asarray(val_labels[padded].astype(np.int32)),
                                   jnp.asarray(valid)))
  return correct / len(val_labels)


@EVALUATORS.register("few_shot")
class FewShotEvaluator(Evaluator):
  """Options: shots, num_seeds, l2_reg, features ("prefix" | "svd" | "random"),
  dims (() → trained), batch_size (val rows per prediction call),
  max_train_examples (0 → shots are drawn from all of train), seed (of the
  "random" features and of the train subset; the shot draws use seeds
  0 … num_seeds − 1).

  Metrics "<n>shot" per dim are means over seeds; extra["std"] holds the stds.
  """

  DEFAULTS = DEFAULTS

  def __init__(self, eval_config: ml_collections.ConfigDict, *, dims: Sequence[int],
               num_classes: int):
    super().__init__(eval_config, dims=dims, num_classes=num_classes)
    self.dims = tuple(int(m) for m in (self.options["dims"] or dims))

  def run(self, ctx) -> EvalResult:
    o = self.options
    train, val = ctx.embeddings("train"), ctx.embeddings("val")
    baselines.check_single_label(train.labels, "few_shot")
    features = baselines.Features(train.z, val.z, o["features"], int(o["seed"]))
    # Rows outside the subset get label −1, so that no shot is drawn from them.
    train_labels = np.full(len(train.labels), -1, np.int64)
    rows = baselines.subsample(len(train_labels), int(o["max_train_examples"]), int(o["seed"]))
    train_labels[rows] = np.asarray(train.labels)[rows]
    val_labels = np.asarray(val.labels)
    metrics: Dict[str, list] = {}
    stds: Dict[str, list] = {}
    batch = min(int(o["batch_size"]), len(val_labels))
    for shots in o["shots"]:
      runs = np.stack([fewshot_accuracy(features, train_labels, val_labels, self.dims,
                                        self.num_classes, shots=int(shots), seed=seed,
                                        l2_reg=float(o["l2_reg"]), batch_size=batch)
                       for seed in range(int(o["num_seeds"]))])
      metrics[f"{shots}shot"] = [float(v) for v in runs.mean(0)]
      stds[f"{shots}shot"] = [float(v) for v in runs.std(0)]
    return EvalResult(name=self.name, dims=list(self.dims), metrics=metrics,
                      extra={"std": stds, "l2_reg": float(o["l2_reg"]),
                             "num_seeds": int(o["num_seeds"]), "features": o["features"]})
