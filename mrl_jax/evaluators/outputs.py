"""An evaluation round as files: per-evaluator JSON / CSV / PNG, TensorBoard, a Markdown report.

Written by process 0 into `<workdir>/eval/step_<N>/`:
  <name>.json          {"name", "step", "dims", "metrics", "extra"}
  <name>.csv           dim, one column per metric
  <name>.png           every metric vs dim (log2 x axis)
  <name>_compare.png   with other runs (`compare`): the first metric of each run side by
                       side (MRL / MRL-E / FF / SVD …); runs under one label (FF-8,
                       FF-16, … trained separately) are merged into one line
  <name>_curve.png     when extra["curve"] is a list of operating points with
                       "expected_dim" (adaptive classification) or "mflops" (adaptive
                       retrieval): accuracy / mAP vs that cost, with the fixed dims for
                       reference
  <name>_mflops.png    when extra["mflops"] is one value per dim: mAP@k vs MFLOPs, with
                       the dict entries of extra that have "mflops_per_query" (exact,
                       adaptive, funnel search) as single points
and `<workdir>/eval/latest.json` (every result of the round, what `compare` reads) and
`<workdir>/eval_report.md`. Scalars go to TensorBoard as eval/<name>/<metric>_d<m>.
"""

import csv
import dataclasses
import json
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from mrl_jax import paths, report
from mrl_jax.metric_writer import MetricWriter, per_dim_scalars
from mrl_jax.errors import MissingFileError

Series = Dict[str, Tuple[List[float], List[float]]]  # label → (x, y)


def write_results(workdir: str, results: Sequence, *, step: int,
                  writer: Optional[MetricWriter] = None, title: str = "",
                  compare: Optional[Mapping[str, Sequence[str]]] = None) -> str:
  """Writes the files above; returns the Markdown report. `compare` maps a label to the
  workdirs of other runs (their `eval/latest.json`) drawn beside this one."""
  if writer is not None:
    writer.write(step, {k: v for r in results for name, values in r.metrics.items()
                        for k, v in per_dim_scalars(f"eval/{r.name}", name, r.dims,
                                                    values).items()})
  out_dir = paths.join(workdir, "eval", f"step_{step}")
  rel = f"eval/step_{step}"  # the report's links, relative to the workdir
  others = load_runs(compare or {})
  lines = [f"# {title or 'Evaluation'}", "", f"Step {step}.", ""]
  for r in results:
    lines += [f"## {r.name}", "", report.format_table(r.dims, r.metrics), ""]
    lines += [f"![{r.name}]({rel}/{png})" for png in _pngs(r, others)] + [""]
    scalars = {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str))}
    if scalars:
      lines += [", ".join(f"{k}: {v}" for k, v in scalars.items()), ""]
  text = "\n".join(lines)
  if jax.process_index() != 0:
    return text
  for r in results:
    base = paths.join(out_dir, r.name)
    write_json(base + ".json", r, step)
    write_csv(base + ".csv", r.dims, r.metrics)
    plot(base + ".png", {k: (r.dims, v) for k, v in r.metrics.items()},
         xlabel="representation size (nesting dim m)", title=f"{r.name} (step {step})")
    if r.name in others:
      key = primary_metric(r.metrics)
      series = {"this run": (r.dims, r.metrics[key]), **others[r.name].get(key, {})}
      plot(base + "_compare.png", series, xlabel="representation size (nesting dim m)",
           title=f"{r.name}: {key}")
    if _curve(r):
      series, kwargs = _curve(r)
      plot(base + "_curve.png", series, **kwargs)
    if _per_dim_mflops(r):
      plot(base + "_mflops.png", *_cost_series(r), xlabel="MFLOPs per query",
           title=f"{r.name}: quality vs cost", log_base=10)
  paths.write_json(paths.join(workdir, "eval", "latest.json"),
                   {"step": int(step), "results": [_jsonable(r, step) for r in results]})
  paths.write_text(paths.join(workdir, "eval_report.md"), text + "\n")
  return text


def write_json(path: str, result, step: int) -> None:
  paths.write_json(path, _jsonable(result, step))


def write_csv(path: str, dims: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> None:
  with paths.atomic_open(path) as f:
    out = csv.writer(f)
    out.writerow(["dim", *metrics])
    for i, m in enumerate(dims):
      out.writerow([int(m), *(repr(float(v[i])) for v in metrics.values())])


def load_runs(compare: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, Series]]:
  """{evaluator: {metric: {label: (dims, values)}}} from other runs' `eval/latest.json`;
  the points of several workdirs under one label are merged and sorted by dim."""
  merged: Dict[str, Dict[str, Dict[str, Dict[int, float]]]] = {}
  for label, workdirs in compare.items():
    for workdir in workdirs:
      path = paths.join(workdir, "eval", "latest.json")
      if not paths.exists(path):
        raise MissingFileError(f"--compare {label}={workdir}: {path} does not exist; run "
                               f"python -m mrl_jax.evaluate on that run first.")
      for r in paths.read_json(path)["results"]:
        for key, values in r["metrics"].items():
          points = merged.setdefault(r["name"], {}).setdefault(key, {}).setdefault(label, {})
          points.update(zip(r["dims"], values))
  return {name: {key: {label: (sorted(p), [p[m] for m in sorted(p)])
                       for label, p in labels.items()} for key, labels in keys.items()}
          for name, keys in merged.items()}


def primary_metric(metrics: Mapping[str, Sequence[float]]) -> str:
  return "top1" if "top1" in metrics else next(iter(metrics))


def plot(path: str, series: Series, markers: Optional[Series] = None, *, xlabel: str,
         title: str, log_base: int = 2) -> None:
  """Accuracy-like series (fractions, drawn in %) vs x on a log axis, one line each;
  `markers` are drawn as points without lines (reference operating points)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  many = len(series) + len(markers or {}) > 6
  fig, ax = plt.subplots(figsize=(8.4 if many else 6.4, 4.2))
  for i, (label, (x, y)) in enumerate(series.items()):
    ax.plot(x, 100 * np.asarray(y, float), marker="o", markersize=3, label=label,
            linestyle=("-", "--", ":")[i // 10 % 3])  # Colours repeat after 10.
  for label, (x, y) in (markers or {}).items():
    ax.plot(x, 100 * np.asarray(y, float), "s", label=label)
  ax.set_xscale("log", base=log_base)
  xs = sorted({float(v) for x, _ in [*series.values(), *(markers or {}).values()] for v in x})
  if log_base == 2 and xs and len(xs) <= 12 and all(v.is_integer() for v in xs):
    ax.set_xticks(xs)
    ax.set_xticklabels([str(int(v)) for v in xs])
  else:
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(  # 2·10^k and 5·10^k only
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
  ax.set_xlabel(xlabel)
  ax.set_ylabel("%")
  ax.grid(True, alpha=0.3)
  if many:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  else:
    ax.legend(fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  paths.savefig(fig, path, dpi=110)
  plt.close(fig)


def _curve(result):
  """(series, kwargs) of an operating-point curve in `extra["curve"]`, or None."""
  curve = result.extra.get("curve")
  if not isinstance(curve, list) or not curve or not isinstance(curve[0], dict):
    return None
  x_key = next((k for k in ("expected_dim", "mflops") if k in curve[0]), None)
  if x_key is None:
    return None
  y_keys = [k for k, v in curve[0].items() if k != x_key and k in result.metrics
            and isinstance(v, (int, float))]
  series = {f"{k} ({result.name})": ([c[x_key] for c in curve], [c[k] for c in curve])
            for k in y_keys}
  markers = ({f"{k} at fixed dims": (result.dims, result.metrics[k]) for k in y_keys}
             if x_key == "expected_dim" else None)
  label = "expected dim" if x_key == "expected_dim" else "MFLOPs per query"
  return series, dict(xlabel=label, title=f"{result.name}: quality vs cost",
                      log_base=2 if x_key == "expected_dim" else 10, markers=markers)


def _cost_series(result) -> Tuple[Series, Series]:
  """The mAP@k metrics (all metrics if none) vs the per-dim MFLOPs, and as markers the
  operating points in `extra` that carry their own cost ({"mflops_per_query": …})."""
  keys = [k for k in result.metrics if k.startswith("mAP")] or list(result.metrics)
  series = {k: (result.extra["mflops"], result.metrics[k]) for k in keys}
  markers = {f"{name} {k}": ([point["mflops_per_query"]], [point[k]])
             for name, point in result.extra.items()
             if isinstance(point, dict) and "mflops_per_query" in point
             for k in keys if k in point}
  return series, markers


def _per_dim_mflops(result) -> bool:
  mflops = result.extra.get("mflops")
  return isinstance(mflops, list) and len(mflops) == len(result.dims)


def _pngs(result, others) -> List[str]:
  names = [f"{result.name}.png"]
  if result.name in others:
    names.append(f"{result.name}_compare.png")
  if _curve(result):
    names.append(f"{result.name}_curve.png")
  if _per_dim_mflops(result):
    names.append(f"{result.name}_mflops.png")
  return names


def _jsonable(result, step: int) -> Dict:
  out = dataclasses.asdict(result)
  out["step"] = int(step)
  out["dims"] = [int(m) for m in result.dims]
  out["metrics"] = {k: [float(v) for v in values] for k, values in result.metrics.items()}
  return json.loads(json.dumps(out, default=_default))


def _default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} in an EvalResult.extra is not JSON-able.")
