"""Train-step throughput (img/s) of a config on synthetic device-resident batches.

Measures the jitted, sharded MRL train step alone: one batch of random uint8
images is placed on the devices once and fed to every step, so the number is
the model's, not the input pipeline's. Prints the device and versions with
the figures.

  python -m mrl_jax.tools.benchmark_train --config=configs/vit_b16_i1k.py:synthetic \
      --config.input.batch_size=256 --steps=50
"""

import json
import time

import flax
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from mrl_jax import cli, config_checks, experiment, sharding

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as a program: importing `benchmark` (tests) defines no flags.
  config_flags.DEFINE_config_file("config", None, "Experiment config (path[:variant]).")
  flags.DEFINE_integer("steps", 30, "Timed steps (after warm-up).")
  flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
  flags.mark_flags_as_required(["config"])


def benchmark(config, num_steps: int, warmup: int) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  config_checks.check_config(config, sharding.data_parallel_size(mesh))
  # Only the learning-rate values depend on the length; keep the config's warm-up valid.
  length = max(num_steps + warmup + 1, config.optim.warmup_steps + 1)
  exp = experiment.build_experiment(config, mesh, length)
  state, train_step, batch_sharding = exp.state, exp.train_step, exp.batch_sharding
  b, s = config.input.batch_size, config.input.image_size
  rng = np.random.default_rng(0)
  labels = rng.integers(0, config.num_classes, b, np.int32)
  if config.input.multi_label:  # a few positives per image, as in JFT
    labels = np.zeros((b, config.num_classes), np.int32)
    labels[np.arange(b)[:, None], rng.integers(0, config.num_classes, (b, 3))] = 1
  batch = {"image": jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                                   batch_sharding),
           "label": jax.device_put(labels, batch_sharding)}
  start = time.perf_counter()
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  return {"model": f"{config.model.name} {config.model.variant}", "mode": config.mrl.mode,
          "dtype": config.model.dtype, "batch": b, "image_size": s,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "jax": jax.__version__, "flax": flax.__version__,
          "compile_s": round(compile_s, 2), "step_ms": round(1000 * elapsed / num_steps, 2),
          "img_per_sec": round(b * num_steps / elapsed, 1),
          "final_loss": float(metrics["loss"])}


def main(argv):
  del argv
  result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
