"""One evaluation round (evaluators on one model state, every output written) and the
training loop's hook that runs each evaluator at its `every_steps`.

The round's caller supplies what the evaluators compute on (an `EvalContext`
of functions); the hook asks its caller for one context per round through
`open_round(step, state)`, a context manager, so it knows nothing of how a
state is embedded or where embeddings are kept.
"""

from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional

from mrl_jax.evaluators import EvalContext, EvalResult, build_evaluators, outputs, run_evaluators
from mrl_jax.metric_writer import MetricWriter


def evaluate_round(ctx: EvalContext, evals: Mapping[str, Any], workdir: str, *, title: str,
                   writer: Optional[MetricWriter] = None,
                   compare: Optional[Dict[str, List[str]]] = None) -> List[EvalResult]:
  """`evals` on `ctx`; their JSON / CSV / PNG, TensorBoard scalars and the report written
  (process 0; see outputs.py)."""
  results = run_evaluators(ctx, dict(evals))
  outputs.write_results(workdir, results, step=ctx.step, writer=writer, compare=compare,
                        title=title)
  return results


def title_of(config: Any) -> str:
  return f"{config.model.name} {config.model.variant} {config.mrl.mode}: evaluation"


class TrainingEvaluations:
  """The training loop's hook: each evaluator every its `every_steps` (0: never during
  training), all of them at the final step. A no-op when `config.evals` is empty."""

  def __init__(self, config: Any, workdir: str, dims, writer: MetricWriter,
               open_round: Callable[[int, Any], ContextManager[EvalContext]]):
    self.config, self.workdir, self.writer = config, workdir, writer
    self.evals = build_evaluators(config, dims=dims)
    self._open_round = open_round

  def __call__(self, step: int, state: Any, *, final: bool = False) -> None:
    due = {name: e for name, e in self.evals.items()
           if final or _due(self.config.evals[name], step)}
    if not due:
      return
    with self._open_round(step, state) as ctx:
      evaluate_round(ctx, due, self.workdir, title=title_of(self.config), writer=self.writer)


def _due(eval_config, step: int) -> bool:
  every = int(eval_config.get("every_steps", 0))  # An evals entry may leave it out.
  return every > 0 and step % every == 0
