"""The evaluation suite on a checkpoint.

  python -m mrl_jax.evaluate --config=configs/demo.py --workdir=/tmp/demo \
      [--step=N] [--only=classification,knn] [--compare=FF=/runs/ff8,FF=/runs/ff16]

restores the run's checkpoint (the latest, or `--step`) onto this machine's
devices, runs the evaluators of `config.evals` (or `--only` those) and writes
`<workdir>/eval/step_<N>/` (JSON / CSV / PNG per evaluator), TensorBoard scalars
and `<workdir>/eval_report.md` (mrl_jax/evaluators/outputs.py). Embeddings are
kept in `<workdir>/embeddings/step_<N>/` and reused by later evaluations of the
same step. `--compare=LABEL=WORKDIR` draws other evaluated runs beside this one.
During training the same evaluators run through `evaluators/runner.py`.
"""

import json
from typing import Dict, List, Sequence

import jax
from absl import flags

from mrl_jax import cli, evaluators, restore
from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import runner
from mrl_jax.metric_writer import MetricWriter

FLAGS = flags.FLAGS


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
  del argv
  cli.init_distributed()
  config, workdir = FLAGS.config, FLAGS.workdir
  compare = parse_compare(FLAGS.compare)
  run = restore.load_run(config, workdir, FLAGS.step)
  evals = evaluators.build_evaluators(config, dims=run.dims, only=FLAGS.only)
  if not evals:
    raise ConfigError("config.evals is empty: add evaluators, e.g. "
                      "evals.classification = {'type': 'classification'}.")
  writer = MetricWriter(workdir)
  try:
    with restore.RoundFunctions(run, workdir, keep_embeddings=True) as fns:
      ctx = evaluators.EvalContext(run.step, run.dims, run.mesh, fns.embed_split,
                                   fns.apply_heads)
      results = runner.evaluate_round(ctx, evals, workdir, title=runner.title_of(config),
                                      writer=writer, compare=compare)
  finally:
    writer.close()  # On a bucket the metrics lines are buffered until here.
  if jax.process_index() == 0:
    print(json.dumps({"step": run.step, "results": {r.name: r.metrics for r in results}}))


def _define_flags() -> None:
  cli.define_config_flags("The run's workdir (its checkpoints; outputs go there too).")
  cli.define_distributed_flags()
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_list("only", [], "Evaluate only these entries of config.evals.")
  flags.DEFINE_list("compare", [], "LABEL=WORKDIR of other evaluated runs to plot beside "
                    "this one (repeat a label to merge runs, e.g. FF-k at several k).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
