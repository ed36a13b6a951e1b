"""Exports a trained model as one weights file plus the metadata a reader needs.

  python -m mrl_jax.tools.export --workdir=/tmp/demo [--step=N] --out=/tmp/demo_export \
      [--format=mrl_jax|torchvision|timm]

--workdir and --out may be local or bucket paths (gs://…; mrl_jax.paths).

mrl_jax (default): `model.safetensors` (params and BatchNorm statistics under
their flat names, `mrl_jax/interop/flat.py`) and `mrl_config.json` (model,
variant, mode, `matryoshka_dims`, classes, preprocessing, the full config);
`mrl_jax.inference.load(OUT)` reads it back. torchvision / timm: the same
weights as a state dict in that library's layout (`model.safetensors`, loadable
with `safetensors.torch.load_file` + `model.load_state_dict`; MRL heads under
the reference code's `fc.nesting_classifier_<i>` / `head.nesting_classifier_<i>`
names), the inverse of `python -m mrl_jax.tools.import_weights`, with the same
`mrl_config.json` beside it.
"""

import json

from absl import flags, logging

from mrl_jax import cli, inference, paths
from mrl_jax.errors import ConfigError
from mrl_jax.interop import flat, timm_vit, torch_files, torchvision_resnet

FLAGS = flags.FLAGS
FORMATS = ("mrl_jax", "torchvision", "timm")


def export(model: inference.Model, out_dir: str, fmt: str = "mrl_jax") -> str:
  """Writes `model` to `out_dir` in `fmt`; returns the weights file."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: choose one of {FORMATS}.")
  config = model.config
  weights = flat.flatten(model.params, model.model_state)
  if fmt == "torchvision":
    if config.model.name != "resnet":
      raise ConfigError(f"--format=torchvision exports ResNets; this is a {config.model.name}.")
    weights = torchvision_resnet.from_flat(weights, config)
  elif fmt == "timm":
    if config.model.name != "vit":
      raise ConfigError(f"--format=timm exports ViTs; this is a {config.model.name}.")
    weights = timm_vit.from_flat(weights, config)
  path = paths.join(out_dir, inference.EXPORT_WEIGHTS)
  meta = inference.export_metadata(config, model.dims, model.step)
  meta["layout"] = fmt
  with paths.staged_write(path) as local:  # safetensors writes a local file; a bucket: uploaded
    torch_files.save_safetensors(weights, local)
  # The config last: a directory with it is a complete export.
  paths.write_json(paths.join(out_dir, inference.EXPORT_CONFIG), meta)
  logging.info("Exported %r (%d arrays, %s layout) to %s.", model, len(weights), fmt, out_dir)
  return path


def main(argv) -> None:
  del argv
  model = inference.load(FLAGS.workdir, step=FLAGS.step)
  path = export(model, FLAGS.out, FLAGS.format)
  print(json.dumps({"out": FLAGS.out, "weights": path, "format": FLAGS.format,
                    "step": model.step, "matryoshka_dims": list(model.dims)}))


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A run's workdir (or a checkpoint step directory).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("format", "mrl_jax", list(FORMATS), "Layout of the weights.")
  flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
