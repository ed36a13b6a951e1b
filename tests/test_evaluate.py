"""The evaluation suite end to end on the demo model, plus its outputs and class masking.

One short training run (the evaluators hooked into the loop), then
`python -m mrl_jax.embed` and `python -m mrl_jax.evaluate` as a user runs them,
each checked against an independent computation: the labels and ids of the
digits source, a direct forward of the restored model, the training loop's own
val accuracy (steps.make_eval_step) and numpy top-k.
"""

import csv
import json
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from mrl_jax.evaluators import EvalResult, outputs
from mrl_jax.evaluators.classification import masked_topk_hits, resolve_class_subset
from tests import cli_runner

DIMS = [2, 4, 8, 16, 32, 64, 128, 256, 512]
CONFIG = textwrap.dedent("""
    import ml_collections
    from configs import demo

    def get_config(arg=None):
      c = demo.get_config("runlocal")
      c.total_steps, c.input.image_size, c.eval_max_batches = 6, 16, 0
      c.evals.classification = ml_collections.ConfigDict(
          {"type": "classification", "every_steps": 3})
      c.evals.odd_classes = ml_collections.ConfigDict(
          {"type": "classification", "class_subset": (1, 3, 5, 7, 9)})
      # An extra eval split (as ImageNet-A would be): other images, the same classes.
      c.embed.splits.shifted = ml_collections.ConfigDict(
          {"source": "synthetic", "synthetic_sizes": {"shifted": 48}})
      c.evals.shifted = ml_collections.ConfigDict(
          {"type": "classification", "split": "shifted", "class_subset": "present"})
      return c
""")


def _run(module, config, workdir, *flags, devices=2):
  proc = cli_runner.run_module(module, f"--config={config}", f"--workdir={workdir}", *flags,
                               devices=devices)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained workdir (6 steps, evaluators at steps 3 and 6) and its config file."""
  root = tmp_path_factory.mktemp("evaluate")
  config = root / "config.py"
  config.write_text(CONFIG)
  workdir = root / "work"
  _run("mrl_jax.main", config, workdir)
  return config, workdir


def _json(path):
  return json.loads(path.read_text())


@pytest.mark.e2e
@pytest.mark.slow
def test_training_runs_the_evaluators_at_their_steps_and_at_the_end(run):
  _, workdir = run
  for step in (3, 6):
    result = _json(workdir / "eval" / f"step_{step}" / "classification.json")
    assert result["step"] == step and result["dims"] == DIMS
  assert not (workdir / "eval" / "step_3" / "odd_classes.json").exists()  # every_steps 0
  # The same accuracy as the loop's own eval step over the whole val split (the heads
  # applied to stored z, not fused with the forward: allow one near-tie of 359 to flip).
  summary = _json(workdir / "summary.json")
  final = _json(workdir / "eval" / "step_6" / "classification.json")["metrics"]
  np.testing.assert_allclose(final["top1"], summary["top1"], atol=1.01 / 359)
  np.testing.assert_allclose(final["top5"], summary["top5"], atol=1.01 / 359)
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "eval/classification/top1_d8" in l] == [3, 6]
  assert not (workdir / "embeddings").exists()  # The loop's rounds clean up after them.


@pytest.mark.e2e
@pytest.mark.slow
def test_embed_cli_writes_the_split_as_the_model_sees_it(run):
  config, workdir = run
  proc = _run("mrl_jax.embed", config, workdir, "--split=val", "--config.embed.shard_size=100")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  directory = workdir / "embeddings" / "step_6" / "val"
  assert out == {"split": "val", "step": 6, "dir": str(directory)}
  assert "ETA" in proc.stderr
  index = _json(directory / "index.json")
  assert [s["count"] for s in index["shards"]] == [100, 100, 100, 59]
  assert (index["num_examples"], index["dim"], index["dtype"]) == (359, 512, "float32")
  z = np.concatenate([np.load(directory / f"{s['name']}.z.npy") for s in index["shards"]])
  labels = np.concatenate([np.load(directory / f"{s['name']}.labels.npy")
                           for s in index["shards"]])
  ids = np.concatenate([np.load(directory / f"{s['name']}.ids.npy") for s in index["shards"]])

  from configs import demo  # pylint: disable=import-outside-toplevel
  from mrl_jax import data, restore, sharding  # pylint: disable=import-outside-toplevel
  cfg = demo.get_config("runlocal")
  cfg.input.image_size = 16
  source = data.build_source(cfg.input, "val", num_classes=10)
  np.testing.assert_array_equal(labels, source.labels)
  np.testing.assert_array_equal(ids, source.ids)
  assert z.shape == (359, 512)

  # A direct forward of the restored model (on this process's 8 devices) on 16 examples.
  restored = restore.load_run(cfg, str(workdir))
  preprocess = data.build_preprocess(cfg.input, "val", num_classes=10)
  images = np.stack([preprocess(source[i], None)["image"] for i in range(16)])
  batch_sharding = sharding.batch_sharding(restored.mesh)
  fn = restore.make_embed_fn(restored.graphdef, restored.state_shardings, batch_sharding,
                           normalization=data.normalization(cfg.input, num_classes=10))
  direct = np.asarray(fn(restored.state, jax.device_put(images, batch_sharding)))
  np.testing.assert_allclose(z[:16], direct, rtol=1e-4, atol=1e-4)
  assert np.abs(direct).max() > 1e-3  # not a blank forward


@pytest.mark.e2e
@pytest.mark.slow
def test_evaluate_cli_writes_tables_plots_and_report(run):
  config, workdir = run
  proc = _run("mrl_jax.evaluate", config, workdir, f"--compare=again={workdir}")
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  summary = _json(workdir / "summary.json")
  np.testing.assert_allclose(printed["results"]["classification"]["top1"], summary["top1"],
                             atol=1.01 / 359)
  step_dir = workdir / "eval" / "step_6"
  for name in ("classification", "odd_classes", "shifted"):
    result = _json(step_dir / f"{name}.json")
    assert result["dims"] == DIMS and all(len(v) == len(DIMS) for v in result["metrics"].values())
    with open(step_dir / f"{name}.csv", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
    assert [int(r["dim"]) for r in rows] == DIMS
    for suffix in (".png", "_compare.png"):
      assert Image.open(step_dir / f"{name}{suffix}").size[0] > 100
  odd = _json(step_dir / "odd_classes.json")
  assert odd["extra"]["num_classes_scored"] == 5
  shifted = _json(step_dir / "shifted.json")
  assert (shifted["extra"]["split"], shifted["extra"]["num_examples"]) == ("shifted", 48)
  ids = np.load(workdir / "embeddings" / "step_6" / "shifted" / "p000-00000.ids.npy")
  np.testing.assert_array_equal(ids, np.arange(48))  # kept for later evaluations
  report = (workdir / "eval_report.md").read_text()
  assert all(f"| {m} |" in report for m in DIMS) and "## shifted" in report


def test_unknown_evaluators_fail_with_the_known_names():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from mrl_jax import evaluators  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"num_classes": 10, "evals": {
      "a": {"type": "classification"}, "b": {"type": "nope"}}})
  with pytest.raises(ValueError, match="No evaluator named \\['c'\\]"):
    evaluators.build_evaluators(config, dims=DIMS, only=["c"])
  with pytest.raises(ValueError, match="Known evaluators: .*classification"):
    evaluators.build_evaluators(config, dims=DIMS)
  assert list(evaluators.build_evaluators(config, dims=DIMS, only=["a"])) == ["a"]


def test_masked_topk_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50, 12)).astype(np.float32)
  labels = rng.integers(0, 12, size=50).astype(np.int32)
  mask = resolve_class_subset([0, 2, 3, 7, 8, 11], labels, 12)
  top1, top5 = (np.asarray(x) for x in masked_topk_hits(logits, labels, mask))
  masked = np.where(mask, logits, -np.inf)
  order = np.argsort(-masked, axis=-1)
  np.testing.assert_array_equal(top1, (order[..., 0] == labels).sum(-1))
  np.testing.assert_array_equal(top5, (order[..., :5] == labels[:, None]).any(-1).sum(-1))
  assert not np.isin(order[..., 0], [1, 4, 5, 6, 9, 10]).any()
  present = resolve_class_subset("present", np.array([4, 4, 9]), 12)
  np.testing.assert_array_equal(np.flatnonzero(present), [4, 9])
  with pytest.raises(ValueError, match="outside"):
    resolve_class_subset([12], labels, 12)


def test_outputs_writer_round_trips_every_number(tmp_path):
  dims = [4, 8, 16]
  knn = EvalResult("knn", dims, {"top1": [0.1, 0.25, 0.5], "mAP@10": [0.05, 0.2, 0.4]},
                   extra={"mflops": [0.4, 0.8, 1.6], "k": 10,
                          "funnel": {"mflops_per_query": 0.5, "mAP@10": 0.38}})
  adaptive = EvalResult("adaptive", dims, {"top1": [0.2, 0.3, 0.4]}, extra={
      "curve": [{"expected_dim": 5.0, "top1": 0.25}, {"expected_dim": 9.0, "top1": 0.38}]})
  text = outputs.write_results(str(tmp_path), [knn, adaptive], step=7, title="t")
  step_dir = tmp_path / "eval" / "step_7"
  saved = _json(step_dir / "knn.json")
  assert saved["metrics"] == knn.metrics and saved["extra"]["mflops"] == [0.4, 0.8, 1.6]
  with open(step_dir / "knn.csv", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["dim", "top1", "mAP@10"]
  np.testing.assert_array_equal(np.array(rows[1:], float),
                                np.column_stack([dims, knn.metrics["top1"],
                                                 knn.metrics["mAP@10"]]))
  for png in ("knn.png", "knn_mflops.png", "adaptive.png", "adaptive_curve.png"):
    assert Image.open(step_dir / png).size[0] > 100, png
  assert (tmp_path / "eval_report.md").read_text() == text + "\n"
  assert "| 16 | 50.00 |" in text and "k: 10" in text
  latest = _json(tmp_path / "eval" / "latest.json")
  assert [r["name"] for r in latest["results"]] == ["knn", "adaptive"]
  # Two runs under one label (FF-k trained per k) merge into one line, sorted by dim.
  other = tmp_path / "ff"
  outputs.write_results(str(other), [EvalResult("knn", [16], {"top1": [0.45]})], step=1)
  outputs.write_results(str(tmp_path / "ff4"), [EvalResult("knn", [4], {"top1": [0.05]})],
                        step=1)
  runs = outputs.load_runs({"FF": [str(other), str(tmp_path / "ff4")]})
  assert runs["knn"]["top1"]["FF"] == ([4, 16], [0.05, 0.45])


def test_every_evaluator_refuses_an_unknown_option():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from mrl_jax import evaluators  # pylint: disable=import-outside-toplevel
  for kind in ("classification", "knn", "retrieval", "linear_probe", "few_shot",
               "adaptive_classification", "adaptive_retrieval"):
    config = ml_collections.ConfigDict({"num_classes": 10, "evals": {
        "e": {"type": kind, "splt": "val"}}})
    with pytest.raises(ValueError, match=rf"Unknown option\(s\) \['splt'\] for the {kind}"):
      evaluators.build_evaluators(config, dims=DIMS)
