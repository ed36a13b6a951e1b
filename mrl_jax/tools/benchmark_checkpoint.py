"""How long a checkpoint save stops the training loop: async versus synchronous.

Builds the config's real train state (ViT-B/16 by default: AdamW, float32, about
86M parameters, so params + two moments ≈ 1 GiB) on the available devices and
saves it with the run's own `Checkpointer`, alternately async and synchronous:
  blocking_s  the time `maybe_save` holds the loop (async: the device→host copy
              and bookkeeping; sync: the whole write),
  total_s     until the checkpoint is complete on disk.
Prints the device and versions, the median of each, and one JSON line.

  python -m mrl_jax.tools.benchmark_checkpoint --repeats=3 --workdir=/tmp/ckpt_bench
"""

import json
import os
import shutil
import statistics
import tempfile
import time

import flax
import jax
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags

from mrl_jax import checkpointing, cli, experiment, sharding

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as a program: importing `benchmark` (tests) defines no flags.
  config_flags.DEFINE_config_file("config", "configs/vit_b16_i1k.py",
                                  "Experiment config (path[:variant]) whose state is saved.")
  flags.DEFINE_integer("repeats", 3, "Saves of each kind (the median is reported).")
  flags.DEFINE_string("workdir", None, "Where to write (default: a temporary directory, "
                      "removed afterwards). Put it on the disk your runs use.")


def _time_save(ckpt, step: int, state) -> tuple:
  start = time.perf_counter()
  ckpt.maybe_save(step, state, {}, force=True)
  blocking = time.perf_counter() - start
  ckpt.wait()
  return blocking, time.perf_counter() - start


def benchmark(config, repeats: int, workdir: str) -> dict:
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh(config.mesh)
  # The length only shapes the LR schedule; keep the config's warm-up valid.
  exp = experiment.build_experiment(config, mesh, config.optim.warmup_steps + 10)
  state = jax.block_until_ready(exp.state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  times = {}
  for kind in ("async", "sync"):
    config.checkpoint.async_save, config.checkpoint.keep = kind == "async", 1
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, kind), config, exp.dims, mesh)
    _time_save(ckpt, 0, state)  # Warm-up: Orbax's thread pools, directory creation.
    runs = [_time_save(ckpt, step, state) for step in range(1, repeats + 1)]
    ckpt.close()
    times[kind] = [statistics.median(r[i] for r in runs) for i in (0, 1)]
  return {"model": f"{config.model.name} {config.model.variant}",
          "optimizer": config.optim.name, "param_dtype": config.model.param_dtype,
          "num_params": exp.num_params, "state_mib": round(nbytes / 2**20, 1),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "flax": flax.__version__,
          "orbax": ocp.__version__, "repeats": repeats,
          "async_blocking_s": round(times["async"][0], 3),
          "async_total_s": round(times["async"][1], 3),
          "sync_blocking_s": round(times["sync"][0], 3),
          "sync_total_s": round(times["sync"][1], 3)}


def main(argv):
  del argv
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="benchmark_checkpoint_")
  try:
    result = benchmark(FLAGS.config, FLAGS.repeats, workdir)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  print(f"{result['model']} train state ({result['num_params']:,} params, "
        f"{result['state_mib']} MiB) on {result['devices']}: a save blocks the loop "
        f"{result['async_blocking_s']}s async (complete after {result['async_total_s']}s) vs "
        f"{result['sync_blocking_s']}s synchronous.", flush=True)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
