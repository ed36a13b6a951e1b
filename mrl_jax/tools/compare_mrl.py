"""The paper's comparison on one config: MRL, MRL-E, FF-k for every k, a plain model.

  python -m mrl_jax.tools.compare_mrl --config=configs/fashion_mnist.py \
      --workdir=workdirs/compare [--study=methods|representations] [--only=MRL,FF-8]

trains every run of the study in `<workdir>/<run>/` (exactly as
`python -m mrl_jax.main` would, with the config's evaluators after training),
then writes `<workdir>/comparison.{md,csv,json}` and one plot per metric
(`comparison_<metric>.png`: every method vs the nesting dim m).

Studies:
  methods          MRL; MRL-E; FF-k for each nesting dim k below d, evaluated
                   at k (FF-d is the plain model); the plain model (mode none),
                   evaluated truncated to every m and through the SVD and
                   random-coordinate baselines of its features (the paper's
                   Figure 2 / Table 1 comparison).
  representations  MRL with z taken at different places of a ResNet (stem ×
                   pooled ReLU / pre-activation / linear neck): what makes the
                   smallest prefixes good (README "Where z is taken").

Rerunning the same command skips finished runs (those with `summary.json`) and
resumes an interrupted one from its checkpoint, so the study can be stopped
and continued at any point. Config overrides (`--config.num_epochs=1`,
`--config.input.train_examples=20000`) apply to every run.
"""

import csv
import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import ml_collections
from absl import flags, logging
from flax import nnx

from mrl_jax import cli, experiment, paths, train
from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import outputs

STUDIES = ("methods", "representations")
# (evaluator instance, metric, row label) of the table, in order.
TABLE_METRICS = (("classification", "top1", "head top-1"),
                 ("linear_probe", "top1", "linear probe"),
                 ("knn", "1nn_top1", "1-NN"),
                 ("retrieval", "mAP@10", "mAP@10"),
                 ("knn", "degenerate_queries", "all-zero queries"))
_BASELINES = ("svd", "random")


@dataclasses.dataclass
class RunSpec:
  """One training run of a study."""
  name: str                                # its directory under --workdir
  label: str                               # its line in the table and plots
  configure: Callable[[ml_collections.ConfigDict], None]
  at_dim: int = 0                          # FF-k: the one dim it is reported at
  baselines: bool = False                  # also report its SVD / random features


def _evals_keep(config, keep: Callable[[str, ml_collections.ConfigDict], bool]) -> None:
  for name in [n for n, e in config.evals.items() if not keep(n, e)]:
    del config.evals[name]


def _features(entry) -> str:
  return entry.get("features", "prefix")


def _embed_width(config) -> int:
  """d, the width of z (the neck's, or the backbone's), from the abstract model."""
  model = nnx.eval_shape(experiment.model_factory(config))
  return model.neck.out_features if model.neck is not None else model.backbone.embed_dim


def methods_study(config) -> List[RunSpec]:
  nesting = tuple(int(m) for m in config.mrl.nesting)
  if len(nesting) < 2:
    raise ConfigError("The methods study needs an explicit nesting list of at least two "
                      "dims (--config.mrl.nesting), the last one the embedding width d.")
  width = _embed_width(config)
  if nesting[-1] != width:
    raise ConfigError(f"The methods study reports the plain model as FF-d, so the last "
                      f"nesting dim must be the embedding width d={width}, not {nesting[-1]}; "
                      f"set --config.mrl.nesting to end at {width}.")

  def mrl_run(mode):
    def configure(c):
      c.mrl.mode = mode
      _evals_keep(c, lambda n, e: _features(e) == "prefix")
    return configure

  def ff_run(k):
    def configure(c):
      c.mrl.mode, c.mrl.ff_dim = "ff", k
      # One head: no cascade; the frozen features only at k (FF-k's own width).
      _evals_keep(c, lambda n, e: _features(e) == "prefix"
                  and e.type != "adaptive_classification")
      for entry in c.evals.values():
        if "dims" in entry:
          entry.dims = (k,)
    return configure

  def plain(c):
    c.mrl.mode = "none"
    _evals_keep(c, lambda n, e: e.type != "adaptive_classification")

  return ([RunSpec("mrl", "MRL", mrl_run("mrl")), RunSpec("mrl_e", "MRL-E", mrl_run("mrl_e"))]
          + [RunSpec(f"ff{k}", "FF-k", ff_run(k), at_dim=k) for k in nesting[:-1]]
          + [RunSpec("plain", "plain (truncated)", plain, baselines=True)])


REPRESENTATIONS = (  # (run name, label, model options, neck)
    ("imagenet_relu", "ImageNet stem, pooled ReLU (paper)", dict(stem="imagenet",
                                                                 representation="relu"), False),
    ("imagenet_preact", "ImageNet stem, pre-activation", dict(stem="imagenet",
                                                              representation="preact"), False),
    ("imagenet_neck", "ImageNet stem, pooled ReLU + linear neck",
     dict(stem="imagenet", representation="relu"), True),
    ("cifar_relu", "CIFAR stem, pooled ReLU", dict(stem="cifar", representation="relu"), False),
    ("cifar_preact", "CIFAR stem, pre-activation", dict(stem="cifar",
                                                        representation="preact"), False),
    ("cifar_neck", "CIFAR stem, pooled ReLU + linear neck", dict(stem="cifar",
                                                                 representation="relu"), True),
)


def representations_study(config) -> List[RunSpec]:
  if config.model.name != "resnet":
    raise ConfigError("The representations study varies a ResNet's stem and output; set "
                      "--config.model.name=resnet.")
  nesting = tuple(int(m) for m in config.mrl.nesting)
  if not nesting:
    raise ConfigError("The representations study needs an explicit --config.mrl.nesting.")

  def variant(options, neck):
    def configure(c):
      c.mrl.mode = "mrl"
      c.model.options.update(options)
      c.model.neck_dim = nesting[-1] if neck else 0
      _evals_keep(c, lambda n, e: e.type in ("classification", "linear_probe", "knn")
                  and _features(e) in ("prefix", "svd"))
    return configure

  return [RunSpec(name, label, variant(options, neck), baselines=True)
          for name, label, options, neck in REPRESENTATIONS]


def run_config(base, spec: RunSpec) -> ml_collections.ConfigDict:
  """The base config with the run's changes; references resolved, so an evaluator's
  `dims` can change without changing `mrl.nesting`."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    spec.configure(config)
  return config


def is_finished(run_dir: str) -> bool:
  return paths.exists(paths.join(run_dir, train.SUMMARY_FILE))


def run_study(base, specs: Sequence[RunSpec], workdir: str) -> Dict[str, float]:
  """Trains and evaluates every unfinished run; returns each run's wall seconds."""
  walls: Dict[str, float] = {}
  todo = [s for s in specs if not is_finished(paths.join(workdir, s.name))]
  logging.info("%d runs, %d finished, %d to train: %s", len(specs), len(specs) - len(todo),
               len(todo), ", ".join(s.name for s in todo) or "none")
  started = time.time()
  for i, spec in enumerate(todo):
    run_dir = paths.join(workdir, spec.name)
    paths.makedirs(run_dir)
    eta = ((time.time() - started) / i * (len(todo) - i)) if i else 0.0
    logging.info("=== run %d/%d: %s (%s)%s", i + 1, len(todo), spec.name, spec.label,
                 f", ETA of the study {eta / 60:.1f} min" if i else "")
    train.run(run_config(base, spec), run_dir)
    jax.clear_caches()  # Each run compiles its own model; free the last one's executables.
  for spec in specs:
    summary = paths.read_json(paths.join(workdir, spec.name, train.SUMMARY_FILE))
    walls[spec.name] = float(summary["wall_seconds"])
  return walls


def _results(run_dir: str) -> Dict[str, dict]:
  """The run's evaluator results by name ({} if its config has no evaluators)."""
  path = paths.join(run_dir, "eval", "latest.json")
  if not paths.exists(path):
    return {}
  return {r["name"]: r for r in paths.read_json(path)["results"]}


def _series(result: Optional[dict], metric: str) -> Dict[int, float]:
  if not result or metric not in result["metrics"]:
    return {}
  return dict(zip(result["dims"], result["metrics"][metric]))


def collect(specs: Sequence[RunSpec], workdir: str) -> List[dict]:
  """Table rows {"method", "metric", "values": {dim: value}}; FF-k runs merge into one
  "FF-k" row per metric, each contributing its own k."""
  rows: Dict[tuple, Dict[int, float]] = {}
  for spec in specs:
    results = _results(paths.join(workdir, spec.name))
    if "classification" not in results:  # the heads' top-1 is in every run's summary
      summary = paths.read_json(paths.join(workdir, spec.name, train.SUMMARY_FILE))
      results["classification"] = {"dims": summary["dims"], "metrics": {"top1": summary["top1"]}}
    for evaluator, metric, label in TABLE_METRICS:
      values = _series(results.get(evaluator), metric)
      if spec.at_dim:
        values = {m: v for m, v in values.items() if m == spec.at_dim}
      if values:
        rows.setdefault((spec.label, label), {}).update(values)
      if not spec.baselines or metric == "degenerate_queries":
        continue
      for method in _BASELINES:
        values = _series(results.get(f"{evaluator}_{method}"), metric)
        if values:
          who = "SVD" if method == "svd" else "random coordinates"
          rows.setdefault((f"{spec.label}: {who}", label), {}).update(values)
  order = {label: i for i, (_, _, label) in enumerate(TABLE_METRICS)}
  out = [{"method": method, "metric": metric, "values": dict(sorted(values.items()))}
         for (method, metric), values in rows.items()]
  return sorted(out, key=lambda r: order[r["metric"]])  # stable: methods keep run order


def adaptive_summary(specs: Sequence[RunSpec], workdir: str,
                     tolerance: float = 0.002) -> List[str]:
  """One line per run with a cascade: the least expected dim at which it matches its
  largest head (the paper's "14× smaller"), or comes within `tolerance` of it."""
  lines = []
  for spec in specs:
    result = _results(paths.join(workdir, spec.name)).get("adaptive_classification")
    if not result:
      continue
    fixed, d = result["metrics"]["top1"][-1], result["dims"][-1]
    near = [c for c in result["extra"]["curve"] if c["top1"] >= fixed - tolerance]
    point = result["extra"].get("matched") or (
        min(near, key=lambda c: c["expected_dim"]) if near else None)
    if point is None:
      lines.append(f"- {spec.label}: no cascade operating point comes within "
                   f"{100 * tolerance:.1f} points of the {d}-dim head's {100 * fixed:.2f}%.")
      continue
    lines.append(f"- {spec.label}: adaptive classification {100 * point['top1']:.2f}% at an "
                 f"expected {point['expected_dim']:.2f} dims; the fixed {d}-dim head: "
                 f"{100 * fixed:.2f}% (thresholds fitted on held-out val, "
                 f"{result['extra']['num_seeds']} seeds).")
  return lines


def write_outputs(workdir: str, rows: List[dict], notes: Sequence[str], title: str) -> str:
  """comparison.{md,csv,json} and comparison_<metric>.png; returns the Markdown."""
  dims = sorted({m for r in rows for m in r["values"]})
  lines = [f"# {title}", ""]
  for metric in dict.fromkeys(r["metric"] for r in rows):
    lines += [f"## {metric} (%)", "", "| method | " + " | ".join(map(str, dims)) + " |",
              "|---|" + "---|" * len(dims)]
    group = [r for r in rows if r["metric"] == metric]
    for r in group:
      cells = [f"{100 * r['values'][m]:.2f}" if m in r["values"] else "" for m in dims]
      lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    png = f"comparison_{_slug(metric)}.png"
    outputs.plot(paths.join(workdir, png),
                 {r["method"]: (list(r["values"]), list(r["values"].values())) for r in group},
                 xlabel="representation size (nesting dim m)", title=f"{metric} vs dim")
    lines += ["", f"![{metric}]({png})", ""]
  lines += list(notes)
  text = "\n".join(lines) + "\n"
  paths.write_text(paths.join(workdir, "comparison.md"), text)
  with paths.atomic_open(paths.join(workdir, "comparison.csv")) as f:
    out = csv.writer(f)
    out.writerow(["method", "metric", "dim", "value"])
    for r in rows:
      for m, v in r["values"].items():
        out.writerow([r["method"], r["metric"], m, repr(float(v))])
  paths.write_json(paths.join(workdir, "comparison.json"), {
      "title": title,
      "rows": [dict(r, values={str(m): v for m, v in r["values"].items()}) for r in rows]})
  return text


def _slug(text: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")


def compare(base, workdir: str, study: str = "methods",
            only: Sequence[str] = ()) -> str:
  """Runs (or resumes) the study in `workdir` and writes its table; returns the Markdown."""
  if study not in STUDIES:
    raise ConfigError(f"Unknown study {study!r}; choose one of {STUDIES}.")
  specs = (methods_study if study == "methods" else representations_study)(base)
  if only:
    unknown = sorted(set(only) - {s.name for s in specs})
    if unknown:
      raise ConfigError(f"--only names unknown runs {unknown}; this study has "
                        f"{[s.name for s in specs]}.")
    specs = [s for s in specs if s.name in only]
  paths.makedirs(workdir)
  start = time.time()
  walls = run_study(base, specs, workdir)
  cores = os.cpu_count()
  notes = adaptive_summary(specs, workdir) + [
      "", f"Wall time per run (training and its evaluations), on "
      f"{jax.device_count()} x {jax.devices()[0].device_kind} ({cores} host cores): "
      + ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in walls.items())
      + f"; {sum(walls.values()) / 60:.1f} min in all.",
      f"Base config (each run changes what its name says): {base.model.name} "
      f"{base.model.variant} {dict(base.model.options)}, "
      f"neck_dim {base.model.neck_dim}, nesting {tuple(base.mrl.nesting)}, "
      f"{base.num_epochs or base.total_steps} {'epochs' if base.num_epochs else 'steps'}, "
      f"train_examples {base.input.train_examples or 'all'}."]
  text = write_outputs(workdir, collect(specs, workdir), notes,
                       title=f"MRL comparison ({study}) on {base.input.source}")
  logging.info("Comparison written to %s in %.1f min:\n%s", workdir,
               (time.time() - start) / 60, text)
  return text


def _define_flags() -> None:
  cli.define_config_flags("Directory of the study: one subfolder per run.")
  flags.DEFINE_enum("study", "methods", list(STUDIES), "Which comparison to run.")
  flags.DEFINE_list("only", [], "Train/report only these runs (by folder name).")


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  compare(FLAGS.config, FLAGS.workdir, FLAGS.study, FLAGS.only)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
