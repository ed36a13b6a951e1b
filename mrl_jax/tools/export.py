"""Exports a trained model as one weights file plus the metadata a reader needs.

  python -m mrl_jax.tools.export --workdir=/tmp/demo [--step=N] --out=/tmp/demo_export \
      [--format=mrl_jax|torchvision|timm]

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
import os

from absl import flags, logging

from mrl_jax import cli, inference
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
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, inference.EXPORT_WEIGHTS)
  torch_files.save_safetensors(weights, path + ".tmp")
  meta = inference.export_metadata(config, model.dims, model.step)
  meta["layout"] = fmt
  with open(os.path.join(out_dir, inference.EXPORT_CONFIG + ".tmp"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  # The config last: a directory with it is a complete export.
  os.replace(path + ".tmp", path)
  os.replace(os.path.join(out_dir, inference.EXPORT_CONFIG + ".tmp"),
             os.path.join(out_dir, inference.EXPORT_CONFIG))
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
