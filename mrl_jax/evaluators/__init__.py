"""Evaluators, each reporting every nesting dim (big_vision style).

An evaluator is a small class registered by name in `EVALUATORS`; a config
names instances in `config.evals` (instance name → {"type": registered name,
"every_steps": N, ...options}) and each is built with its own block:

  @EVALUATORS.register("knn")
  class KnnEvaluator:
    def __init__(self, eval_config, *, dims, num_classes): ...
    def run(self, ctx: EvalContext) -> EvalResult: ...

An `EvalContext` is one evaluation round of one model state: it computes each
split's embeddings once (through `mrl_jax.embed`, cached on disk under
`<workdir>/embeddings/step_<N>/<split>`, memory-mapped back) and the trained
heads' logits once, and every evaluator of the round shares them.
"""

import dataclasses
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mrl_jax import embed, sharding
from mrl_jax.embed import Embeddings
from mrl_jax.errors import ConfigError
from mrl_jax.registry import Registry

EVALUATORS = Registry("evaluator")

__all__ = ["EVALUATORS", "Embeddings", "EvalContext", "EvalResult", "build_evaluators",
           "run_evaluators"]


@dataclasses.dataclass
class EvalResult:
  """One evaluator's output: per-dim series plus JSON-able extras (curves, timings…)."""
  name: str                          # the evaluator's config name, e.g. "knn"
  dims: List[int]                    # x axis: nesting dims, or any dims evaluated
  metrics: Dict[str, List[float]]    # per-dim series, each len(dims); accuracies in [0, 1]
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


class EvalContext:
  """What the evaluators of one round share: the model at `step`, its embeddings, logits.

  With `keep_embeddings=False` (the training loop) the embeddings this round
  computed are deleted by `close()`; the standalone CLI keeps them, and reuses
  embeddings already on disk for the step (e.g. from `python -m mrl_jax.embed`).
  """

  def __init__(self, run: embed.Run, workdir: str, *, keep_embeddings: bool = True):
    self.config, self.mesh, self.step = run.config, run.mesh, run.step
    self.dims: Tuple[int, ...] = tuple(run.dims)
    self.workdir = workdir
    self._run = run
    self._keep = keep_embeddings
    self._embeddings: Dict[str, Embeddings] = {}
    self._logits: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    self._written: List[str] = []

  def embeddings(self, split: str) -> Embeddings:
    """z [N, d], labels, ids of `split` ("train", "val" or a config.embed.splits name)."""
    if split not in self._embeddings:
      directory = embed.embeddings_dir(self.workdir, self.step, split)
      if not embed.is_complete(directory):
        options = self.config.get("embed", {})
        embed.embed_split(self._run, split, directory,
                          dtype=options.get("dtype", "float32"),
                          shard_size=options.get("shard_size", 0),
                          batch_size=options.get("batch_size", 0))
        self._written.append(directory)
      self._embeddings[split] = embed.read_embeddings(directory)
    return self._embeddings[split]

  def logits(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(float32 logits [M, N, L] of the trained heads, in `dims` order; labels [N])."""
    if split not in self._logits:
      emb = self.embeddings(split)
      self._logits[split] = (self._apply_head(emb.z), np.asarray(emb.labels))
    return self._logits[split]

  def _apply_head(self, z: np.ndarray) -> np.ndarray:
    batch_sharding = sharding.batch_sharding(self.mesh)
    if "head" not in self._run.compiled:
      graphdef = self._run.graphdef

      def head(state, z):
        model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)
        return model.head(z.astype(jnp.float32)).astype(jnp.float32)

      self._run.compiled["head"] = jax.jit(
          head, in_shardings=(self._run.state_shardings, batch_sharding),
          out_shardings=sharding.replicated(self.mesh))
    head_fn = self._run.compiled["head"]
    block = _round_up(self.config.input.eval_batch_size, sharding.data_parallel_size(self.mesh))
    out = []
    for start in range(0, len(z), block):
      rows = np.asarray(z[start:start + block], np.float32)
      padded = np.zeros((block, z.shape[1]), np.float32)
      padded[:len(rows)] = rows
      array = jax.make_array_from_callback(padded.shape, batch_sharding,
                                           lambda index, p=padded: p[index])
      out.append(np.asarray(head_fn(self._run.state, array))[:, :len(rows)])
    return np.concatenate(out, axis=1)

  def close(self) -> None:
    """Deletes the embeddings this round wrote, unless they are kept."""
    self._embeddings.clear()
    self._logits.clear()
    if self._keep or not self._written:
      return
    if jax.process_count() > 1:  # Every process is done with the files.
      multihost_utils.sync_global_devices(f"mrl_jax_eval_done_{self.step}")
    if jax.process_index() == 0:
      for directory in self._written:
        shutil.rmtree(directory, ignore_errors=True)
        for parent in (os.path.dirname(directory), os.path.dirname(os.path.dirname(directory))):
          if os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)


def build_evaluators(config: Any, *, dims: Sequence[int],
                     only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """{instance name: evaluator} for `config.evals` (or its `only` entries), by name.

  Each evaluator gets its block with `name` set to the instance name.
  """
  _import_all()
  evals = config.get("evals") or {}
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


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _import_all() -> None:
  # Each module registers its evaluators on import (the static list of the suite).
  from mrl_jax.evaluators import (adaptive_classification, adaptive_retrieval,  # noqa: F401
                                  classification, few_shot, knn, linear_probe, retrieval)
