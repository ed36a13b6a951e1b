"""End-to-end training speed: the real input pipeline on ImageNet-like JPEG shards
feeding the real train loop, and the share of each step the devices wait for data.

  python -m mrl_jax.tools.benchmark_end_to_end --config=configs/vit_b16_i1k.py:synthetic \
      --config.input.batch_size=256 --workers=16 --data_dir=/tmp/mrl_jax_e2e_shards

The config's train split is replaced by `--num_images` generated JPEGs (~87 KB,
about 450 × 350; mrl_jax/tools/synthetic_jpegs.py) in arrayrecord shards under
`--data_dir`, made once and reused by later runs; its model, batch, preprocessing
(decode, crop, flip, mixup…) and `input.workers` (or `--workers`) are measured.
Three loops run, each `--warmup` untimed steps and then `--steps` timed ones:

  compute only   the train loop on one device-resident batch (made by the same
                 pipeline, so the step is the same program): the devices' rate
  end to end     the same loop fed as `mrl_jax.main` feeds it: `train.train_batches`
                 (grain worker processes) through `pipeline.prefetch_to_device`
  pipeline only  the host batches alone, no device: the input's own rate

The data-wait fraction is 1 − t_compute / t_end_to_end per step: the share of the
end-to-end step that the compute does not explain. The time Python spends in
`next(batches)` is not that: under async dispatch Python runs ahead of the
devices, so it can wait for a batch while they still compute the steps queued
before. Each timed window starts and ends with the devices idle
(`jax.block_until_ready`).

With W worker processes the steps (timed and warm-up) are rounded up to a multiple
of W. The workers hand out batches in turn, and when the input is the slower side,
all W finish a round at about the same time, so batches come in bursts of W; a
window of whole rounds is not skewed by where in a burst it starts or ends.
"""

import copy
import itertools
import json
import os
import tempfile
import time

import jax
from absl import flags
from ml_collections import config_flags

from mrl_jax import cli, config_checks, data, experiment, fault_tolerance, sharding, train
from mrl_jax.data import pipeline
from mrl_jax.errors import UserError
from mrl_jax.tools import benchmark_env, synthetic_jpegs

FLAGS = flags.FLAGS
FLAG_NAMES = ("config", "data_dir", "num_images", "quality", "steps", "warmup", "workers",
              "out")


def _define_flags(flag_values=FLAGS) -> None:
  """FLAG_NAMES; only when run as a program (importing this module defines nothing)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config (path[:variant]).",
                                  flag_values=flag_values)
  flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "mrl_jax_e2e_shards"),
                      "Where the generated JPEG shards are kept (made on the first run).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_images", 2560, "JPEGs to generate (the epoch the pipeline "
                       "repeats).", flag_values=flag_values)
  flags.DEFINE_integer("quality", 90, "JPEG quality of the generated images.",
                       flag_values=flag_values)
  flags.DEFINE_integer("steps", 64, "Timed steps of each loop (rounded up to a multiple of "
                       "the workers).", flag_values=flag_values)
  flags.DEFINE_integer("warmup", 16, "Untimed steps before them (the same rounding).",
                       flag_values=flag_values)
  flags.DEFINE_integer("workers", None, "grain worker processes (default: the config's "
                       "input.workers; 0: threads in this process).", flag_values=flag_values)
  flags.DEFINE_string("out", None, "Also write the JSON result to this file.",
                      flag_values=flag_values)


def wait_fraction(compute_step_s: float, e2e_step_s: float) -> float:
  """The share of an end-to-end step the devices spend waiting for data: 1 − t_compute /
  t_e2e, and 0 where noise makes the end-to-end step the shorter."""
  return max(0.0, 1.0 - compute_step_s / e2e_step_s)


def whole_rounds(steps: int, workers: int) -> int:
  """`steps` rounded up to a multiple of the worker count (0 workers: unchanged)."""
  return -(-steps // workers) * workers if workers > 0 else steps


def on_generated_shards(config, data_dir: str, workers=None):
  """A copy of `config` whose train split is the generated shards in `data_dir`."""
  config = copy.deepcopy(config)
  config.input.source, config.input.data_dir = "arrayrecord", data_dir
  config.input.splits.train = "train"
  if workers is not None:
    config.input.workers = workers
  return config


def _steps(train_step, state, batches, guard, num_steps: int):
  """`num_steps` steps of the train loop's hot path (mrl_jax/train.py: the step on the
  next batch, its non-finite flag read one step late); returns (state, seconds), the
  last step finished."""
  start, metrics = time.perf_counter(), None
  for step in range(num_steps):
    state, metrics = train_step(state, next(batches))
    guard.update(step, metrics["nonfinite"])
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def _host_seconds(host_batches, warmup: int, num_steps: int) -> float:
  """Seconds for `num_steps` host batches after `warmup` of them; stops the workers."""
  try:
    for _ in range(warmup):
      next(host_batches)
    start = time.perf_counter()
    for _ in range(num_steps):
      next(host_batches)
    return time.perf_counter() - start
  finally:
    host_batches.close()


def benchmark(config, data_dir: str, *, num_images: int, steps: int, warmup: int,
              workers=None, quality: int = 90, name: str = "") -> dict:
  """The three loops on `config` with its train split on the generated shards (and
  `workers` in place of its input.workers, if given); the figures as one JSON-able dict."""
  config = on_generated_shards(config, data_dir, workers)
  if steps < 1:
    raise UserError(f"--steps={steps}: time at least one step.")
  workers = int(config.input.workers)
  steps, warmup = whole_rounds(steps, workers), whole_rounds(warmup, workers)
  mesh = sharding.make_mesh(config.mesh)
  config_checks.check_config(config, sharding.data_parallel_size(mesh))
  shards = synthetic_jpegs.write_shards(data_dir, num_images, num_classes=config.num_classes,
                                        quality=quality)
  source = data.build_source(config.input, "train", num_classes=config.num_classes)
  # Only the learning-rate values depend on the length; keep the config's warm-up valid.
  length = max(2 * (warmup + steps) + 2, config.optim.warmup_steps + 1)
  exp = experiment.build_experiment(config, mesh, length)
  guard = fault_tolerance.NonFiniteGuard(0, lambda: "")  # counts, never stops a benchmark

  in_process = copy.deepcopy(config)
  in_process.input.workers = 0
  host_batches = train.train_batches(in_process, source)
  one_batch = pipeline.to_global(next(host_batches), exp.batch_sharding)
  host_batches.close()
  start = time.perf_counter()
  state, _ = _steps(exp.train_step, exp.state, itertools.repeat(one_batch), guard, 1)
  compile_s = time.perf_counter() - start
  state, _ = _steps(exp.train_step, state, itertools.repeat(one_batch), guard, warmup)
  state, compute_s = _steps(exp.train_step, state, itertools.repeat(one_batch), guard, steps)

  # Started only now, so that no batches pile up while the step compiles.
  batches = pipeline.prefetch_to_device(train.train_batches(config, source),
                                        exp.batch_sharding)
  try:
    state, _ = _steps(exp.train_step, state, batches, guard, warmup)
    state, e2e_s = _steps(exp.train_step, state, batches, guard, steps)
  finally:
    batches.close()
  guard.flush()
  pipeline_s = _host_seconds(train.train_batches(config, source), warmup, steps)

  batch = config.input.batch_size
  rate = lambda seconds: round(batch * steps / seconds, 1)
  return {"config": name, "model": f"{config.model.name} {config.model.variant}",
          "mode": config.mrl.mode, "dtype": config.model.dtype, "batch": batch,
          "image_size": config.input.image_size, "pp_train": config.input.pp_train,
          "workers": workers, "steps": steps, "warmup": warmup,
          "devices": benchmark_env.devices(), "versions": benchmark_env.versions(),
          "e2e_img_per_sec": rate(e2e_s), "compute_img_per_sec": rate(compute_s),
          "pipeline_img_per_sec": rate(pipeline_s),
          "e2e_step_ms": round(1000 * e2e_s / steps, 2),
          "compute_step_ms": round(1000 * compute_s / steps, 2),
          "data_wait_fraction": round(wait_fraction(compute_s / steps, e2e_s / steps), 4),
          "slower_side": "input" if pipeline_s > compute_s else "compute",
          "compile_s": round(compile_s, 2), "nonfinite_steps": guard.total,
          "data": shards}


def format_table(r: dict) -> str:
  data_ = r["data"]
  made = "reused" if data_["reused"] else f"generated in {data_['generate_s']:.1f} s"
  lines = [f"{r['config'] or r['model']}: {r['model']} {r['mode']} {r['dtype']}, batch "
           f"{r['batch']} at {r['image_size']} px, {r['workers']} workers, {r['steps']} "
           f"timed steps after {r['warmup']}",
           f"{'loop':<40} {'img/s':>10} {'ms/step':>9}"]
  for label, key in (("pipeline only (host batches, no device)", "pipeline"),
                     ("compute only (one device-resident batch)", "compute"),
                     ("end to end (pipeline -> train step)", "e2e")):
    img_s = r[f"{key}_img_per_sec"]
    lines.append(f"{label:<40} {img_s:>10.1f} {1000 * r['batch'] / img_s:>9.2f}")
  lines += [f"data wait: {100 * r['data_wait_fraction']:.1f}% of the end-to-end step "
            f"(the {r['slower_side']} is the slower side)",
            f"data: {data_['num_images']} JPEGs, {data_['mean_record_kb']} KB each, "
            f"{data_['num_shards']} shards in {data_['dir']} ({made})",
            f"device: {r['devices']}; versions: "
            + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.config is None:
    raise UserError("Give --config (e.g. configs/vit_b16_i1k.py:synthetic).")
  name = config_flags.get_config_filename(FLAGS["config"])
  overrides = config_flags.get_override_values(FLAGS["config"])
  if overrides:
    name += " " + " ".join(f"--config.{k}={v}" for k, v in sorted(overrides.items()))
  result = benchmark(FLAGS.config, FLAGS.data_dir, num_images=FLAGS.num_images,
                     steps=FLAGS.steps, warmup=FLAGS.warmup, workers=FLAGS.workers,
                     quality=FLAGS.quality, name=name)
  print(format_table(result), flush=True)
  line = json.dumps(result)
  if FLAGS.out:
    with open(FLAGS.out, "w", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
