"""Entry point: python -m mrl_jax.main --config=configs/demo.py --workdir=/tmp/demo.

Any config field can be overridden: --config.input.batch_size=128. On a TPU pod,
a SLURM or Open MPI GPU cluster, `jax.distributed` is initialised from the
environment; elsewhere pass --coordinator_address/--num_processes/--process_id
(all processes run the same command). Rerunning the same command resumes.
"""

from absl import flags

from mrl_jax import cli, train

FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  cli.init_distributed()
  train.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.define_config_flags("Directory for metrics, plots, checkpoints and results.")
  cli.define_distributed_flags()
  cli.run(main)
