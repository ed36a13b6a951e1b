"""Evaluators, each reporting every nesting dim (big_vision style).

An evaluator is a small class registered by name in `EVALUATORS`; a config
names instances in `config.evals` (instance name → {"type": registered name,
"every_steps": N, ...options}) and each is built with its own block:

  @EVALUATORS.register("knn")
  class KnnEvaluator(Evaluator):
    DEFAULTS = dict(ks=(1, 10), dims=())        # its options; unknown keys are refused
    def run(self, ctx: EvalContext) -> EvalResult: ...

Evaluators receive functions, never the loop, a checkpoint or a CLI (as
big_vision's evaluators receive `predict_fns`): the caller of a round builds
an `EvalContext` from an embed-a-split function and an apply-the-heads
function (`mrl_jax.restore.RoundFunctions` for a trained run), and every
evaluator of the round shares the embeddings and logits it computes once.
`runner.py` runs a round and writes its outputs; `outputs.py` the files.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from mrl_jax.embeddings import Embeddings
from mrl_jax.errors import ConfigError
from mrl_jax.registry import Registry

EVALUATORS = Registry("evaluator")
# Keys of an evals block that belong to the runner, not to the evaluator's options.
RUNNER_KEYS = ("type", "every_steps", "name")

__all__ = ["EVALUATORS", "Embeddings", "EvalContext", "EvalResult", "Evaluator",
           "build_evaluators", "run_evaluators"]


@dataclasses.dataclass
class EvalResult:
  """One evaluator's output: per-dim series plus JSON-able extras (curves, timings…)."""
  name: str                          # the evaluator's config name, e.g. "knn"
  dims: List[int]                    # x axis: nesting dims, or any dims evaluated
  metrics: Dict[str, List[float]]    # per-dim series, each len(dims); accuracies in [0, 1]
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalContext:
  """What the evaluators of one round share: the model at `step` seen through two functions.

  `embed_split(split)` gives a split's Embeddings (z [N, d], labels, ids) for
  "train", "val" or a `config.embed.splits` name; `apply_heads(z)` the trained
  heads' float32 logits [M, N, L] (in `dims` order) of z [N, d]. Each split's
  embeddings and logits are computed once per round, on first use.
  """
  step: int
  dims: Tuple[int, ...]                            # the trained nesting dims
  mesh: Any                                        # for evaluators that compute on devices
  embed_split: Callable[[str], Embeddings]
  apply_heads: Callable[[np.ndarray], np.ndarray]
  _embeddings: Dict[str, Embeddings] = dataclasses.field(default_factory=dict, repr=False)
  _logits: Dict[str, Tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict,
                                                                        repr=False)

  def embeddings(self, split: str) -> Embeddings:
    if split not in self._embeddings:
      self._embeddings[split] = self.embed_split(split)
    return self._embeddings[split]

  def logits(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(float32 logits [M, N, L] of the trained heads, in `dims` order; labels [N])."""
    if split not in self._logits:
      emb = self.embeddings(split)
      self._logits[split] = (self.apply_heads(emb.z), np.asarray(emb.labels))
    return self._logits[split]


class Evaluator:
  """Base of the registered evaluators: `options` is the instance's config block over the
  class's `DEFAULTS` (an unknown key, such as a typo, is refused); `name` the instance
  name (`config.evals.<name>`); `trained_dims` the model's nesting dims."""
  DEFAULTS: Mapping[str, Any] = {}

  def __init__(self, eval_config: Mapping[str, Any], *, dims: Sequence[int], num_classes: int):
    kind = EVALUATORS.name_of(type(self))
    self.name = eval_config.get("name") or kind
    self.options = evaluator_options(eval_config, self.DEFAULTS, kind)
    self.trained_dims = tuple(int(m) for m in dims)
    self.num_classes = num_classes

  def run(self, ctx: EvalContext) -> EvalResult:
    raise NotImplementedError

  def check_trained(self, dims: Sequence[int]) -> None:
    """Refuses dims without a trained head (for evaluators that read the heads)."""
    missing = sorted(set(dims) - set(self.trained_dims))
    if missing:
      raise ConfigError(f"{self.name}: dims {missing} have no trained head (trained: "
                        f"{list(self.trained_dims)}); use a subset of those.")


def evaluator_options(eval_config: Mapping, defaults: Mapping[str, Any],
                      evaluator: str) -> Dict[str, Any]:
  """The evaluator's options: its block over `defaults`, rejecting unknown keys (a typo
  such as `learing_rate` would otherwise silently run with the default)."""
  unknown = sorted(set(eval_config) - set(defaults) - set(RUNNER_KEYS))
  if unknown:
    raise ConfigError(f"Unknown option(s) {unknown} for the {evaluator} evaluator in "
                      f"config.evals; its options are {sorted(defaults)}.")
  return {key: eval_config.get(key, value) for key, value in defaults.items()}


def build_evaluators(config: Any, *, dims: Sequence[int],
                     only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """{instance name: evaluator} for `config.evals` (or its `only` entries), by name.

  Each evaluator gets its block with `name` set to the instance name.
  """
  _import_all()
  evals = config.evals
  unknown = sorted(set(only or ()) - set(evals))
  if unknown:
    raise ConfigError(f"No evaluator named {unknown} in config.evals (it has "
                      f"{sorted(evals) or 'none'}).")
  built = {}
  for name, eval_config in evals.items():
    if only and name not in only:
      continue
    if "type" not in eval_config:
      raise ConfigError(f"config.evals.{name} has no `type`; set it to one of "
                        f"{EVALUATORS.names()}.")
    eval_config = eval_config.copy_and_resolve_references()
    with eval_config.unlocked():
      eval_config.name = name
    built[name] = EVALUATORS.get(eval_config.type)(
        eval_config, dims=tuple(dims), num_classes=config.num_classes)
  return built


def run_evaluators(ctx: EvalContext, evaluators: Dict[str, Any]) -> List[EvalResult]:
  """Runs each evaluator on `ctx`, logging its time and a one-line summary."""
  results = []
  for name, evaluator in evaluators.items():
    start = time.time()
    result = evaluator.run(ctx)
    for key, values in result.metrics.items():
      if len(values) != len(result.dims):
        raise ValueError(f"Evaluator {name!r} returned {len(values)} values of {key!r} for "
                         f"{len(result.dims)} dims.")
    result.extra.setdefault("seconds", round(time.time() - start, 3))
    results.append(result)
    first = next(iter(result.metrics), None)
    summary = " ".join(f"d{m}={100 * v:.1f}" for m, v in
                       zip(result.dims, result.metrics[first])) if first else ""
    logging.info("eval %s @ step %d (%.1fs): %s %% %s", name, ctx.step,
                 result.extra["seconds"], first or "", summary)
  return results


def _import_all() -> None:
  # Each module registers its evaluators on import (the static list of the suite).
  from mrl_jax.evaluators import (adaptive_classification, adaptive_retrieval,  # noqa: F401
                                  classification, few_shot, knn, linear_probe, retrieval)
