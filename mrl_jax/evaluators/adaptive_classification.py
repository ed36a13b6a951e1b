"""Adaptive classification: a confidence cascade over the nesting dims (MRL.md).

An example is classified at the smallest dim m_i whose head is confident
enough — max softmax probability ≥ t_i — and at the largest dim otherwise. Its
cost is the dim it stopped at, so a threshold set has a top-1 accuracy and an
expected dim Σ m·P(stop at m).

Search. For a trade-off λ the thresholds maximise top1 − λ·E[m]/m_max on a
held-out part of val (`holdout_fraction`, the paper's 10K of 50K → 0.2). They
are found greedily pair by pair, as in the paper: starting from "never stop
early" (t = ∞ everywhere), t_i for the pair (m_i, m_i+1) is set to the best
value on the grid {0, 1/(G−1), …, 1} ∪ {∞} given all the others, for
i = 0 … M−2 in order, and the sweep repeats until nothing changes (at most
`passes` times). Each step is exact over the grid and costs one sort: the
examples that reach m_i either stop there (value correct_i − λ·m_i/m_max) or go
on through the fixed rest of the cascade, so the objective as a function of t_i
is a cumulative sum over examples sorted by confidence. Ties go to the larger
threshold (the more accurate choice). Accuracy and expected dim are then
measured on the rest of val; each seed draws a new split, and the curve over λ
reports mean ± std over seeds.
"""

from typing import Any, Dict, Sequence

import ml_collections
import numpy as np

from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator, baselines

DEFAULT_PENALTIES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
DEFAULTS = dict(holdout_fraction=0.2, num_seeds=30, penalties=DEFAULT_PENALTIES,
                num_thresholds=101, passes=3, split="val", dims=())


def stop_indices(confidence: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
  """[N] index of the dim each example stops at: the first i with conf_i ≥ t_i."""
  stops = confidence[:-1] >= np.asarray(thresholds, np.float64)[:, None]
  stops = np.concatenate([stops, np.ones((1, confidence.shape[1]), bool)])
  return np.argmax(stops, axis=0)


def cascade_stats(confidence: np.ndarray, correct: np.ndarray, dims: Sequence[int],
                  thresholds: Sequence[float]) -> Dict[str, Any]:
  """top1, expected_dim and the fraction of examples stopping at each dim."""
  stop = stop_indices(confidence, thresholds)
  columns = np.arange(confidence.shape[1])
  fractions = np.bincount(stop, minlength=len(dims)) / len(stop)
  return {"top1": float(np.mean(correct[stop, columns])),
          "expected_dim": float(np.sum(fractions * np.asarray(dims, np.float64))),
          "stop_fraction": fractions}


def greedy_thresholds(confidence: np.ndarray, correct: np.ndarray, dims: Sequence[int],
                      penalty: float, num_thresholds: int = 101, passes: int = 3) -> np.ndarray:
  """[M−1] thresholds maximising top1 − penalty·E[m]/m_max (greedy, see module doc)."""
  grid = np.concatenate([[np.inf], np.linspace(1.0, 0.0, num_thresholds)])  # Descending.
  dims = np.asarray(dims, np.float64)
  value = correct.astype(np.float64) - penalty * dims[:, None] / dims[-1]  # [M, N]
  columns = np.arange(confidence.shape[1])
  thresholds = np.full(len(dims) - 1, np.inf)
  for _ in range(passes):
    previous = thresholds.copy()
    for i in range(len(dims) - 1):
      thresholds[i] = np.inf
      stop = stop_indices(confidence, thresholds)
      reach = stop >= i  # With t_i = ∞, these go on to stop[reach] > i.
      conf = confidence[i, reach]
      gain = value[i, reach] - value[stop[reach], columns[reach]]
      order = np.argsort(-conf, kind="stable")
      cumulative = np.concatenate([[0.0], np.cumsum(gain[order])])
      # Number of reaching examples with conf ≥ t, for each grid t.
      counts = np.searchsorted(-conf[order], -grid, side="right")
      thresholds[i] = grid[int(np.argmax(cumulative[counts]))]
    if np.array_equal(thresholds, previous):
      break
  return thresholds


def cascade_curve(confidence: np.ndarray, correct: np.ndarray, dims: Sequence[int], *,
                  holdout_fraction: float = 0.2, num_seeds: int = 30,
                  penalties: Sequence[float] = DEFAULT_PENALTIES, num_thresholds: int = 101,
                  passes: int = 3) -> Dict[str, Any]:
  """The operating curve from per-dim confidences and correctness, both [M, N].

  Returns {"top1": [M] fixed-dim accuracy on the evaluation parts (mean over
  seeds), "curve": one entry per penalty with expected_dim, top1 (means and
  stds over seeds), stop_fraction [M] (mean) and thresholds (per seed; None =
  never stop at that dim), "matched": the curve entry of least expected dim whose
  top1 is at least the largest dim's, or None}.
  """
  num = confidence.shape[1]
  holdout = int(round(holdout_fraction * num))
  if not 0 < holdout < num:
    raise ConfigError(f"holdout_fraction={holdout_fraction} leaves no examples to search "
                      f"or to evaluate out of {num}; choose a value in (0, 1).")
  fixed, runs = [], [[] for _ in penalties]
  for seed in range(num_seeds):
    order = np.random.default_rng(seed).permutation(num)
    search, rest = order[:holdout], order[holdout:]
    fixed.append(correct[:, rest].mean(axis=1))
    for runs_at, penalty in zip(runs, penalties):
      thresholds = greedy_thresholds(confidence[:, search], correct[:, search], dims,
                                     penalty, num_thresholds, passes)
      stats = cascade_stats(confidence[:, rest], correct[:, rest], dims, thresholds)
      runs_at.append(dict(stats, thresholds=thresholds))
  curve = []
  for penalty, runs_at in zip(penalties, runs):
    top1 = np.array([r["top1"] for r in runs_at])
    expected = np.array([r["expected_dim"] for r in runs_at])
    curve.append({
        "penalty": float(penalty),
        "expected_dim": float(expected.mean()), "expected_dim_std": float(expected.std()),
        "top1": float(top1.mean()), "top1_std": float(top1.std()),
        "stop_fraction": [float(v) for v in np.mean([r["stop_fraction"] for r in runs_at], 0)],
        "thresholds": [[None if np.isinf(t) else float(t) for t in r["thresholds"]]
                       for r in runs_at]})
  fixed_top1 = np.mean(fixed, axis=0)
  good = [c for c in curve if c["top1"] >= fixed_top1[-1]]
  matched = min(good, key=lambda c: c["expected_dim"]) if good else None
  return {"top1": [float(v) for v in fixed_top1], "curve": curve, "matched": matched}


def cascade_search(probs: np.ndarray, labels: np.ndarray, dims: Sequence[int],
                   **options) -> Dict[str, Any]:
  """`cascade_curve` from per-dim class probabilities [M, N, C] and labels [N]."""
  probs = np.asarray(probs)
  if probs.ndim != 3 or probs.shape[0] != len(dims) or probs.shape[1] != len(labels):
    raise ValueError(f"probs must be [M={len(dims)}, N={len(labels)}, C]; got {probs.shape}.")
  correct = np.argmax(probs, axis=-1) == np.asarray(labels)[None, :]
  return cascade_curve(probs.max(axis=-1), correct, dims, **options)


def softmax_confidence(logits: np.ndarray, labels: np.ndarray):
  """(max softmax probability [M, N], correct [M, N]) from logits [M, N, C], per dim
  (one [N, C] float64 slice at a time rather than all probabilities at once)."""
  confidence = np.empty(logits.shape[:2])
  correct = np.empty(logits.shape[:2], bool)
  for i in range(logits.shape[0]):
    x = np.asarray(logits[i], np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    confidence[i] = 1.0 / np.exp(shifted).sum(axis=1)  # exp(0) / Σ exp.
    correct[i] = np.argmax(x, axis=1) == labels
  return confidence, correct


@EVALUATORS.register("adaptive_classification")
class AdaptiveClassificationEvaluator(Evaluator):
  """Options: holdout_fraction, num_seeds, penalties (the λ sweep), num_thresholds,
  passes, split (whose trained-head logits to use), dims (() → all trained dims,
  otherwise a subset of them)."""

  DEFAULTS = DEFAULTS

  def __init__(self, eval_config: ml_collections.ConfigDict, *, dims: Sequence[int],
               num_classes: int):
    super().__init__(eval_config, dims=dims, num_classes=num_classes)
    self.dims = tuple(int(m) for m in (self.options["dims"] or dims))
    self.check_trained(self.dims)

  def run(self, ctx) -> EvalResult:
    o = self.options
    logits, labels = ctx.logits(o["split"])
    labels = np.asarray(labels)
    baselines.check_single_label(labels, "adaptive_classification")
    heads = [self.trained_dims.index(m) for m in self.dims]
    confidence, correct = softmax_confidence(np.asarray(logits)[heads], labels)
    result = cascade_curve(confidence, correct, self.dims,
                           holdout_fraction=float(o["holdout_fraction"]),
                           num_seeds=int(o["num_seeds"]),
                           penalties=tuple(float(p) for p in o["penalties"]),
                           num_thresholds=int(o["num_thresholds"]), passes=int(o["passes"]))
    extra: Dict[str, Any] = {"curve": result["curve"], "matched": result["matched"],
                                   "holdout_fraction": float(o["holdout_fraction"]),
                                   "num_seeds": int(o["num_seeds"])}
    return EvalResult(name=self.name, dims=list(self.dims), metrics={"top1": result["top1"]},
                      extra=extra)
