"""Per-nesting-dim results as files a person reads: JSON, CSV, Markdown and a PNG plot
(written through mrl_jax.paths, so the workdir may be a bucket)."""

import csv
from typing import Dict, Sequence

import jax
import numpy as np

from mrl_jax import paths


def write_per_dim_results(workdir: str, dims: Sequence[int], columns: Dict[str, Sequence[float]],
                          *, name: str = "results", title: str = "") -> str:
  """Writes `{name}.json/.csv/.md/.png`; returns the Markdown table. Process 0 only."""
  table = format_table(dims, columns)
  if jax.process_index() != 0:
    return table
  base = paths.join(workdir, name)
  rows = [dict(dim=int(m), **{k: float(v[i]) for k, v in columns.items()})
          for i, m in enumerate(dims)]
  paths.write_json(base + ".json", {"title": title, "rows": rows})
  with paths.atomic_open(base + ".csv") as f:
    writer = csv.DictWriter(f, fieldnames=["dim", *columns])
    writer.writeheader()
    writer.writerows(rows)
  paths.write_text(base + ".md", (f"# {title}\n\n" if title else "") + table + "\n")
  _plot(base + ".png", dims, columns, title)
  return table


def format_table(dims: Sequence[int], columns: Dict[str, Sequence[float]]) -> str:
  header = "| dim | " + " | ".join(columns) + " |"
  rule = "|---:|" + "---:|" * len(columns)
  lines = [header, rule]
  for i, m in enumerate(dims):
    cells = " | ".join(_fmt(k, v[i]) for k, v in columns.items())
    lines.append(f"| {m} | {cells} |")
  return "\n".join(lines)


def _fmt(key: str, value: float) -> str:
  return f"{100 * value:.2f}" if "top" in key or "acc" in key else f"{value:.4f}"


def _plot(path: str, dims, columns, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, values in columns.items():
    if "top" in key or "acc" in key:
      ax.plot(dims, 100 * np.asarray(values), marker="o", label=key)
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(dims))
  ax.set_xticklabels([str(m) for m in dims])
  ax.set_xlabel("representation size (nesting dim m)")
  ax.set_ylabel("accuracy (%)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  ax.set_title(title or "accuracy vs nesting dim")
  fig.tight_layout()
  paths.savefig(fig, path, dpi=120)
  plt.close(fig)
