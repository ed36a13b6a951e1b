"""The training loop: build → restore → step → log / evaluate / save → report.

Side effects (I/O, logging, checkpoints) live here and in the modules it calls.
"""

import contextlib
import time
from typing import Any, Dict, Iterator, Optional

import jax
import numpy as np
from absl import logging

from mrl_jax import (checkpointing, config_checks, data, evaluators, experiment, fault_tolerance,
                     paths, report, restore, sharding)
from mrl_jax.data import pipeline
from mrl_jax.evaluators import runner
from mrl_jax.metric_writer import MetricWriter, per_dim_scalars


SUMMARY_FILE = "summary.json"  # written last: a run with it has finished


def run(config: Any, workdir: str) -> Dict[str, Any]:
  """A whole run as `python -m mrl_jax.main` makes it: `config.json`, training (resumed
  from the workdir's checkpoint if there is one) with its evaluations, `summary.json`."""
  checkpointing.check_writable(workdir)
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  results = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, SUMMARY_FILE), results)
  return results


def train_and_evaluate(config: Any, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir`; returns the final per-dim evaluation."""
  start = time.time()
  mesh = sharding.make_mesh(config.mesh)
  config_checks.check_config(config, sharding.data_parallel_size(mesh))
  # Data first: a missing dataset must fail before minutes of compilation.
  train_source = data.build_source(config.input, "train", num_classes=config.num_classes)
  val_source = data.build_source(config.input, "val", num_classes=config.num_classes)
  total_steps = config_checks.total_steps(config, len(train_source))

  exp = experiment.build_experiment(config, mesh, total_steps)
  dims, state, batch_sharding = exp.dims, exp.state, exp.batch_sharding
  logging.info("Model %s %s, head %s, %s params, nesting %s, %d classes.",
               config.model.name, config.model.variant, config.mrl.mode,
               f"{exp.num_params:,}", list(dims), config.num_classes)
  logging.info("Mesh %s over %d devices (%d processes); %d train / %d val examples; "
               "%d steps of batch %d.", dict(mesh.shape), mesh.devices.size,
               jax.process_count(), len(train_source), len(val_source), total_steps,
               config.input.batch_size)
  logging.info("Sharded parameters:\n%s", exp.sharding_summary)
  writer = MetricWriter(workdir)
  evals = runner.TrainingEvaluations(config, workdir, dims, writer,
                                     _round_opener(config, workdir, mesh, exp))
  ckpt = checkpointing.Checkpointer(workdir, config, dims, mesh)
  host_batches = train_batches(config, train_source)
  state, step = ckpt.restore_or_init(state, host_batches)  # Before prefetching starts.
  batches = pipeline.prefetch_to_device(host_batches, batch_sharding)
  guard = fault_tolerance.NonFiniteGuard(config.checkpoint.max_nonfinite_in_a_row,
                                         ckpt.describe)
  watcher = fault_tolerance.PreemptionWatcher(ckpt.reached_preemption)
  progress = _Progress(total_steps, config.input.batch_size)
  logging.info("Compiling the train step and starting at step %d (setup took %.1fs).",
               step + 1, time.time() - start)
  try:
    for step in range(step + 1, total_steps + 1):
      state, metrics = exp.train_step(state, next(batches))
      guard.update(step, metrics["nonfinite"])
      if step == 1 or step % config.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        progress.log(step, metrics, dims)
        writer.write(step, {"train/loss": metrics["loss"], "train/lr": metrics["lr"],
                            "train/grad_norm": metrics["grad_norm"],
                            "train/img_per_sec": progress.rate,
                            "train/skipped_images": batches.skipped,
                            "train/nonfinite_steps": guard.total,
                            **per_dim_scalars("train", "loss", dims, metrics["loss_per_dim"]),
                            **per_dim_scalars("train", "top1", dims, metrics["top1_per_dim"])})
      val = None
      if config.eval_every and step % config.eval_every == 0 and step != total_steps:
        val = _evaluate(exp.eval_step, state, val_source, config, batch_sharding, dims,
                        writer, step)
      evals(step, state, final=step == total_steps)  # config.evals, each at its every_steps
      stop = watcher.should_stop(step)
      if step != total_steps or stop:
        ckpt.maybe_save(step, state, batches.get_state(), metrics=_val_scalars(dims, val),
                        force=stop, nonfinite_steps=guard.total)
      if stop:  # The `finally` below waits for the save before main exits 0.
        raise fault_tolerance.Preempted(
            f"Stopped by {watcher.signal_name} after step {step}; its checkpoint is in "
            f"{ckpt.directory}. Rerun the same command to resume.")
    guard.flush()
    results = _evaluate(exp.eval_step, state, val_source, config, batch_sharding, dims,
                        writer, step)
    ckpt.maybe_save(step, state, batches.get_state(), metrics=_val_scalars(dims, results),
                    force=True, nonfinite_steps=guard.total)
  finally:
    watcher.close()
    batches.close()
    ckpt.close()  # Waits for the saves in flight, whatever ended the run.
    writer.close()  # On a bucket the metrics are buffered: written now, even if preempted.
  table = report.write_per_dim_results(
      workdir, dims, results,
      title=f"{config.model.name} {config.model.variant} {config.mrl.mode}: "
            f"val accuracy per nesting dim after {step} steps")
  wall = time.time() - start
  logging.info("Done: %d steps in %.1fs (%.0f img/s while training).\n%s",
               step, wall, progress.mean_rate, table)
  return {"dims": list(dims), **{k: [float(x) for x in v] for k, v in results.items()},
          "steps": step, "wall_seconds": wall, "train_img_per_sec": progress.mean_rate}


def train_batches(config: Any, source) -> pipeline.HostIterator:
  """The host-local train batches of `source` as training reads them: the config's
  preprocessing and batch ops, its seed, `input.workers` grain processes. (The
  end-to-end benchmark measures this very iterator.)"""
  return pipeline.train_iterator(
      source, data.build_preprocess(config.input, "train", num_classes=config.num_classes),
      global_batch=config.input.batch_size, seed=config.seed,
      num_classes=config.num_classes, multi_label=config.input.multi_label,
      workers=config.input.workers)


def _round_opener(config: Any, workdir: str, mesh, exp):
  """The training evaluations' `open_round`: the live state as a restore `Run`, its
  embeddings deleted after the round; the jitted forwards compile once per run."""
  compiled: Dict[Any, Any] = {}

  @contextlib.contextmanager
  def open_round(step: int, state: Any) -> Iterator[evaluators.EvalContext]:
    run = restore.Run(config, mesh, exp.graphdef, state, exp.state_shardings, step, exp.dims,
                        compiled=compiled)
    with restore.RoundFunctions(run, workdir, keep_embeddings=False) as fns:
      yield evaluators.EvalContext(step, run.dims, mesh, fns.embed_split, fns.apply_heads)

  return open_round


def _val_scalars(dims, results) -> Optional[Dict[str, float]]:
  """{'val/top1_d8': …} for the checkpoint's best-metric bookkeeping (None: no eval)."""
  if results is None:
    return None
  return {k: v for name in results for k, v in per_dim_scalars("val", name, dims,
                                                               results[name]).items()}


def _evaluate(eval_step, state, source, config, batch_sharding, dims, writer, step):
  """Per-dim top-1 / top-5 / loss over the val split (or its first eval_max_batches)."""
  num_batches = pipeline.num_eval_batches(len(source), config.input.eval_batch_size)
  if config.eval_max_batches:
    num_batches = min(num_batches, config.eval_max_batches)
  iterator = pipeline.eval_iterator(
      source, data.build_preprocess(config.input, "val", num_classes=config.num_classes),
      global_batch=config.input.eval_batch_size, num_classes=config.num_classes,
      multi_label=config.input.multi_label, workers=config.input.workers)
  start, sums, skipped = time.time(), None, []
  for _, batch in zip(range(num_batches), iterator):
    out = eval_step(state, pipeline.to_global(batch, batch_sharding))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    skipped.extend(batch["id"][batch["skipped"] == 1].tolist())
  sums = jax.device_get(sums)
  count = max(float(sums["count"]), 1.0)
  results = {k: np.asarray(sums[k]) / count for k in ("top1", "top5", "loss")}
  summary = " ".join(f"d{m}={100 * a:.1f}" for m, a in zip(dims, results["top1"]))
  logging.info("eval @ step %d (%d examples, %.1fs): top-1 %% %s", step, int(count),
               time.time() - start, summary)
  if skipped:
    logging.warning("eval skipped %d unreadable images on this process (ids %s%s).",
                    len(skipped), skipped[:10], " …" if len(skipped) > 10 else "")
  writer.write(step, {"val/skipped_images": len(skipped),
                      **{k: v for name in results
                         for k, v in per_dim_scalars("val", name, dims, results[name]).items()}})
  return results


class _Progress:
  """The progress line: step, loss, top-1 at the smallest and largest dim, img/s, ETA."""

  def __init__(self, total_steps: int, batch_size: int):
    self.total, self.batch = total_steps, batch_size
    self.rate = self.mean_rate = 0.0
    self._last_step = self._first_step = None
    self._last_time = self._first_time = None

  def log(self, step: int, metrics: Dict[str, np.ndarray], dims) -> None:
    now = time.time()
    if self._last_step is None:  # The first step includes compilation: not timed.
      self._first_step, self._first_time = step, now
    else:
      self.rate = (step - self._last_step) * self.batch / max(now - self._last_time, 1e-9)
      self.mean_rate = ((step - self._first_step) * self.batch
                        / max(now - self._first_time, 1e-9))
    self._last_step, self._last_time = step, now
    eta = (self.total - step) * self.batch / self.mean_rate if self.mean_rate else 0.0
    top1 = metrics["top1_per_dim"]
    logging.info("step %d/%d | loss %.4f | top-1 d%d %.1f%% d%d %.1f%% | lr %.3g | "
                 "%.0f img/s | ETA %s", step, self.total, metrics["loss"], dims[0],
                 100 * top1[0], dims[-1], 100 * top1[-1], metrics["lr"], self.rate,
                 _duration(eta))


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
