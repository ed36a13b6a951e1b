"""What every command line shares: its flags, `jax.distributed`, and errors as one line.

An entry point defines its own flags inside a function (so importing it defines
nothing), adds the shared ones and hands its `main` to `run`:

  def main(argv):
    cli.init_distributed()
    train.run(FLAGS.config, FLAGS.workdir)

  if __name__ == "__main__":
    cli.define_config_flags("Directory for metrics, plots and results.")
    cli.define_distributed_flags()
    cli.run(main)

`run` prints a `UserError` (bad config, missing data, no checkpoint, a diverged
run) as one `error: …` line and exits 1, without a traceback; a preempted run
that saved its checkpoint exits 0, so a scheduler restarts the same command.

When one process of a multi-process run dies, the others must not wait on it
forever. A collective that fails with it (gloo on CPU raises at once) exits 1
here with what to do; a collective that just hangs (NCCL, ICI) is ended by JAX's
coordination service after --heartbeat_timeout_seconds (SIGABRT, its own
message, beside which `init_distributed` logged ours).
"""

import os
import sys
from typing import Callable, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mrl_jax import xla_flags
from mrl_jax.errors import UserError
from mrl_jax.fault_tolerance import Preempted

FLAGS = flags.FLAGS

# Set by the schedulers whose processes `jax.distributed.initialize()` finds by itself.
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def define_config_flags(workdir_help: str) -> None:
  """--config (path[:variant], every field overridable) and --workdir, both required."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])


def define_distributed_flags() -> None:
  """The multi-process flags; all processes run the same command."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "Index of this process (multi-process).")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "jax.distributed: 'auto' detects SLURM / Open MPI / GKE TPU from the "
                    "environment; 'on' always lets JAX auto-detect (Cloud TPU VMs, whose "
                    "workers are found through the metadata server); 'off' never.")
  # JAX's coordination service: the bounds on waiting for the other processes.
  flags.DEFINE_integer("initialization_timeout_seconds", 300,
                       "How long a process waits at start for all the others to connect.")
  flags.DEFINE_integer("heartbeat_timeout_seconds", 60,
                       "A process silent this long is dead: every other one then stops "
                       "(non-zero exit) instead of waiting on it forever.")
  flags.DEFINE_integer("shutdown_timeout_seconds", 120,
                       "How long a finished process waits for the others at exit, so one "
                       "that failed alone cannot keep the rest waiting longer than this.")


def init_distributed() -> None:
  """Explicit flags win; otherwise let JAX auto-detect TPU pods, SLURM and Open MPI."""
  if FLAGS.distributed == "off":
    return
  timeouts = dict(initialization_timeout=FLAGS.initialization_timeout_seconds,
                  heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
                  shutdown_timeout_seconds=FLAGS.shutdown_timeout_seconds)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, **timeouts)
  elif FLAGS.distributed == "on" or (any(os.environ.get(k) for k in _CLUSTER_ENV)
                                     and _multi_process_env()):
    jax.distributed.initialize(**timeouts)
  logging.info("JAX %s, process %d/%d, %d local / %d global devices (%s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  if jax.process_count() > 1:
    # JAX ends a survivor from C++ (SIGABRT), past any handler of ours: say it here.
    logging.info("If a process dies, the others stop within --heartbeat_timeout_seconds="
                 "%d with JAX's 'Terminating process because the JAX distributed service "
                 "detected fatal errors'; rerun the same command on every host to resume "
                 "from the last checkpoint.", FLAGS.heartbeat_timeout_seconds)


def _multi_process_env() -> bool:
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if key in os.environ:
      return int(os.environ[key]) > 1
  return "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`app.run(main)` with absl-configured JAX, the GPU XLA flags (xla_flags.py), stray
  arguments refused, and the exits above."""

  def wrapped(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
    flags_in_effect = xla_flags.apply_gpu_defaults()  # Before any backend starts.
    if flags_in_effect:
      logging.info("XLA_FLAGS: %s", flags_in_effect)
    try:
      main(argv)
    except Preempted as e:  # Saved; the scheduler may restart the same command.
      logging.warning("%s", e)
      sys.exit(0)
    except UserError as e:  # The user's to fix: one clear message, no traceback.
      logging.error("%s", e)
      sys.exit(f"error: {e}")
    except jax.errors.JaxRuntimeError as e:
      if jax.process_count() == 1:
        raise
      _exit_failed_collective(e)

  jax.config.config_with_absl()
  app.run(wrapped)


def _exit_failed_collective(error: Exception) -> None:
  """Exits 1 at once: a normal exit would first wait at JAX's shutdown barrier for the
  processes that are gone, until the heartbeat or shutdown timeout."""
  logging.exception("A JAX operation failed in process %d/%d.", jax.process_index(),
                    jax.process_count())
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  sys.stderr.write(f"error: {first_line}\nIn a multi-process run this is most often "
                   "another process that died (see its log). Rerunning the same command on "
                   "every host resumes from the last checkpoint.\n")
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access
