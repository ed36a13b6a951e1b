"""Entry point: python -m mrl_jax.main --config=configs/demo.py --workdir=/tmp/demo.

Any config field can be overridden: --config.input.batch_size=128. On a TPU pod,
a SLURM or Open MPI GPU cluster, `jax.distributed` is initialised from the
environment; elsewhere pass --coordinator_address/--num_processes/--process_id
(all processes run the same command).
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mrl_jax import errors, train
from mrl_jax.fault_tolerance import Preempted

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, plots and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed: 'auto' detects SLURM / Open MPI / GKE TPU from the "
                  "environment; 'on' always lets JAX auto-detect (Cloud TPU VMs, whose "
                  "workers are found through the metadata server); 'off' never.")
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def init_distributed() -> None:
  """Explicit flags win; otherwise let JAX auto-detect TPU pods, SLURM and Open MPI."""
  if FLAGS.distributed == "off":
    return
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif FLAGS.distributed == "on" or (any(os.environ.get(k) for k in _CLUSTER_ENV)
                                     and _multi_process_env()):
    jax.distributed.initialize()


def _multi_process_env() -> bool:
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if key in os.environ:
      return int(os.environ[key]) > 1
  return "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  init_distributed()
  config, workdir = FLAGS.config, FLAGS.workdir
  logging.info("JAX %s, process %d/%d, %d local / %d global devices (%s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    train.run(config, workdir)
  except Preempted as e:  # Saved; the scheduler may restart the same command.
    logging.warning("%s", e)
    sys.exit(0)
  except errors.USER_ERRORS as e:
    # The user's to fix: one clear message, no traceback.
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
