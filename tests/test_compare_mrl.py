"""The comparison study in its smallest form: every run trained once, table from the runs'
own results, finished runs skipped on a rerun."""

import csv
import json
import os

import pytest

from configs import fashion_mnist
from mrl_jax.tools import compare_mrl


def _tiny_config():
  config = fashion_mnist.get_config("runlocal,synthetic")
  # The smallest ViT (few parameter arrays: the checkpoints are cheap) and a neck to 64.
  config.model.name, config.model.variant, config.model.options = "vit", "mu/4", {}
  config.mrl.nesting = (8, 64)
  config.input.image_size = 16
  config.total_steps = 2
  config.input.synthetic_sizes.train, config.input.synthetic_sizes.val = 64, 32
  config.evals.knn = fashion_mnist.get_config().evals.knn  # frozen features too
  config.evals.knn.dims = config.mrl.get_ref("nesting")
  config.evals.knn_svd = config.evals.knn.copy_and_resolve_references()
  config.evals.knn_svd.features = "svd"
  return config


@pytest.mark.slow
def test_methods_study_trains_each_run_reports_it_and_skips_it_after(tmp_path):
  config = _tiny_config()
  text = compare_mrl.compare(config, str(tmp_path))
  runs = ["mrl", "mrl_e", "ff8", "plain"]
  for run in runs:
    assert (tmp_path / run / "summary.json").exists()
    assert json.loads((tmp_path / run / "config.json").read_text())["mrl"]["mode"] == {
        "mrl": "mrl", "mrl_e": "mrl_e", "ff8": "ff", "plain": "none"}[run]
  # FF-8 was evaluated at its own width only; the baselines only on the plain model.
  ff = json.loads((tmp_path / "ff8" / "eval" / "latest.json").read_text())["results"]
  assert {r["name"]: r["dims"] for r in ff} == {"classification": [8], "knn": [8]}
  mrl = {r["name"] for r in
         json.loads((tmp_path / "mrl" / "eval" / "latest.json").read_text())["results"]}
  assert mrl == {"classification", "knn"}
  # Every table cell is the run's own number.
  rows = {(r["method"], r["metric"], int(r["dim"])): float(r["value"])
          for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
  knn = {r["name"]: r for r in
         json.loads((tmp_path / "plain" / "eval" / "latest.json").read_text())["results"]}
  assert rows[("plain (truncated): SVD", "1-NN", 8)] == pytest.approx(
      knn["knn_svd"]["metrics"]["1nn_top1"][0])
  assert rows[("FF-k", "head top-1", 8)] == pytest.approx(ff[0]["metrics"]["top1"][0])
  assert ("FF-k", "head top-1", 64) not in rows  # FF-64 is the plain model
  assert {m for m, metric, _ in rows if metric == "all-zero queries"} == {
      "MRL", "MRL-E", "FF-k", "plain (truncated)"}
  assert "| MRL-E |" in text and "Wall time per run" in text
  assert (tmp_path / "comparison_1_nn.png").stat().st_size > 0
  # Rerun: nothing trains again (a finished run's checkpoint is not even opened).
  stamps = {run: os.path.getmtime(tmp_path / run / "summary.json") for run in runs}
  compare_mrl.compare(config, str(tmp_path))
  assert stamps == {run: os.path.getmtime(tmp_path / run / "summary.json") for run in runs}


def test_unknown_runs_and_studies_are_refused(tmp_path):
  config = _tiny_config()
  with pytest.raises(compare_mrl.ConfigError, match="ff8"):
    compare_mrl.compare(config, str(tmp_path), only=["ff3"])
  with pytest.raises(compare_mrl.ConfigError, match="methods"):
    compare_mrl.compare(config, str(tmp_path), study="nope")


def test_a_run_without_evaluators_still_reports_its_heads(tmp_path):
  config = _tiny_config()
  config.evals = type(config.evals)()
  compare_mrl.compare(config, str(tmp_path), only=["ff8"])
  summary = json.loads((tmp_path / "ff8" / "summary.json").read_text())
  rows = compare_mrl.collect(
      [s for s in compare_mrl.methods_study(config) if s.name == "ff8"], str(tmp_path))
  assert rows == [{"method": "FF-k", "metric": "head top-1",
                   "values": {8: pytest.approx(summary["top1"][0])}}]


def test_methods_study_needs_nesting_up_to_the_embedding_width():
  config = _tiny_config()
  config.mrl.nesting = (8, 32)  # d is the neck's 64: FF-32 would be missing
  with pytest.raises(compare_mrl.ConfigError, match="end at 64"):
    compare_mrl.methods_study(config)
