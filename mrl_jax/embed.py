"""Embeddings z (the backbone output before the head) of a split, written to disk in shards.

  python -m mrl_jax.embed --config=configs/demo.py --workdir=/tmp/demo --split=train \
      [--step=N] [--dtype=float16] [--out=DIR]

The model of a run's checkpoint (the latest, or `--step`) embeds every example
of the split with the eval preprocessing, sharded over all devices and hosts
(`mrl_jax.restore.embed_split`), into DIR (default
`<workdir>/embeddings/step_<N>/<split>`; the format is `mrl_jax.embeddings`'s,
read back with `mrl_jax.embeddings.read_embeddings(DIR)`). Splits other than
train/val are defined in `config.embed.splits` (name → overrides of
`config.input`).
"""

import json

import jax
from absl import flags

from mrl_jax import cli, restore
from mrl_jax.embeddings import embeddings_dir

FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  cli.init_distributed()
  config = FLAGS.config
  restore.split_input_config(config, FLAGS.split)  # An unknown split fails before the restore.
  run = restore.load_run(config, FLAGS.workdir, FLAGS.step)
  out = FLAGS.out or embeddings_dir(FLAGS.workdir, run.step, FLAGS.split)
  restore.embed_split(run, FLAGS.split, out, dtype=FLAGS.dtype)
  if jax.process_index() == 0:
    print(json.dumps({"split": FLAGS.split, "step": run.step, "dir": out}))


def _define_flags() -> None:
  cli.define_config_flags("The run's workdir (its checkpoints).")
  cli.define_distributed_flags()
  flags.DEFINE_string("split", "val", "train, val or a split of config.embed.splits.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", None, ["float16", "float32"],
                    "Storage dtype (default: config.embed.dtype).")
  flags.DEFINE_string("out", "", "Output directory (default: "
                      "<workdir>/embeddings/step_<N>/<split>).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
