"""The evaluation suite on a checkpoint, and the same evaluators during training.

  python -m mrl_jax.evaluate --config=configs/demo.py --workdir=/tmp/demo \
      [--step=N] [--only=classification,knn] [--compare=FF=/runs/ff8,FF=/runs/ff16]

restores the run's checkpoint (the latest, or `--step`) onto this machine's
devices, runs the evaluators of `config.evals` (or `--only` those) and writes
`<workdir>/eval/step_<N>/` (JSON / CSV / PNG per evaluator), TensorBoard scalars
and `<workdir>/eval_report.md` (mrl_jax/evaluators/outputs.py). Embeddings are
kept in `<workdir>/embeddings/step_<N>/` and reused by later evaluations of the
same step. `--compare=LABEL=WORKDIR` draws other evaluated runs beside this one.
"""

import json
from typing import Any, Dict, List, Optional, Sequence

import jax
from absl import app, flags, logging

from mrl_jax import embed, errors, evaluators
from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import outputs
from mrl_jax.metric_writer import MetricWriter


def evaluate_run(run: embed.Run, workdir: str, evals: Dict[str, Any], *,
                 writer: Optional[MetricWriter] = None, keep_embeddings: bool = True,
                 compare: Optional[Dict[str, List[str]]] = None
                 ) -> List[evaluators.EvalResult]:
  """One round: `evals` on `run`'s state, every output written (process 0)."""
  ctx = evaluators.EvalContext(run, workdir, keep_embeddings=keep_embeddings)
  try:
    results = evaluators.run_evaluators(ctx, evals)
  finally:
    ctx.close()
  config = run.config
  outputs.write_results(
      workdir, results, step=run.step, writer=writer, compare=compare,
      title=f"{config.model.name} {config.model.variant} {config.mrl.mode}: evaluation")
  return results


class TrainingEvaluations:
  """The training loop's hook: each evaluator every its `every_steps` (0: never during
  training), all of them at the final step. A no-op when `config.evals` is empty."""

  def __init__(self, config: Any, workdir: str, mesh, graphdef, state_shardings,
               dims: Sequence[int], writer: MetricWriter):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.state_shardings, self.dims, self.writer = state_shardings, tuple(dims), writer
    self.evals = evaluators.build_evaluators(config, dims=dims)
    self._graphdef = graphdef
    self._compiled = {}  # The rounds' jitted forwards, compiled once per run.

  def __call__(self, step: int, state: Any, *, final: bool = False) -> None:
    due = {name: e for name, e in self.evals.items()
           if final or _due(self.config.evals[name], step)}
    if not due:
      return
    run = embed.Run(self.config, self.mesh, self._graphdef, state, self.state_shardings,
                    step, self.dims, compiled=self._compiled)
    evaluate_run(run, self.workdir, due, writer=self.writer, keep_embeddings=False)


def _due(eval_config, step: int) -> bool:
  every = int(eval_config.get("every_steps", 0))
  return every > 0 and step % every == 0


def parse_compare(items: Sequence[str]) -> Dict[str, List[str]]:
  """["FF=/a", "FF=/b", "SVD=/c"] → {"FF": ["/a", "/b"], "SVD": ["/c"]}."""
  runs: Dict[str, List[str]] = {}
  for item in items:
    label, sep, workdir = item.partition("=")
    if not sep or not label or not workdir:
      raise ConfigError(f"--compare entry {item!r} is not LABEL=WORKDIR.")
    runs.setdefault(label, []).append(workdir)
  return runs


def main(argv) -> None:
  """The CLI; its flags are defined only when run as a program (`_define_flags`)."""
  from mrl_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  main_lib.init_distributed()
  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    compare = parse_compare(FLAGS.compare)
    run = embed.load_run(config, workdir, FLAGS.step)
    evals = evaluators.build_evaluators(config, dims=run.dims, only=FLAGS.only)
    if not evals:
      raise ConfigError("config.evals is empty: add evaluators, e.g. "
                        "evals.classification = {'type': 'classification'}.")
    writer = MetricWriter(workdir)
    results = evaluate_run(run, workdir, evals, writer=writer, compare=compare)
    writer.close()
  except errors.USER_ERRORS as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    print(json.dumps({"step": run.step, "results": {r.name: r.metrics for r in results}}))


def _define_flags() -> None:
  # --config, --workdir and the multi-process flags are the training entry point's.
  from mrl_jax import main as _  # noqa: F401  # pylint: disable=import-outside-toplevel
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_list("only", [], "Evaluate only these entries of config.evals.")
  flags.DEFINE_list("compare", [], "LABEL=WORKDIR of other evaluated runs to plot beside "
                    "this one (repeat a label to merge runs, e.g. FF-k at several k).")


if __name__ == "__main__":
  _define_flags()
  jax.config.config_with_absl()
  app.run(main)
