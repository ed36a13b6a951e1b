"""Imports another library's weights as an mrl_jax run: evaluate, embed or fine-tune it.

  python -m mrl_jax.tools.import_weights --from=final_weights.pt --kind=mrl_resnet50 \
      --out=/tmp/mrl_r50 [--mode=mrl|mrl_e|ff|none] [--num_classes=N]
  python -m mrl_jax.evaluate --config=/tmp/mrl_r50/config.py --workdir=/tmp/mrl_r50 \
      --config.input.data_dir=...

Kinds:
  mrl_resnet50        the RAIVNLab/MRL ResNet50 releases (BlurPool, MRL / MRL-E / FF-k
                      heads; `module.` prefixes stripped)
  torchvision_resnet  torchvision ResNet18-152 state dicts (optionally with MRL heads)
  timm_vit            timm `vit_*_patch*_*` state dicts or .safetensors
The model's variant, nesting list and head mode are read from the keys and
shapes (`mrl_jax/interop/`); where they cannot be (a plain 2048-wide `fc` is
MRL-E or FF-2048), --mode is required. Every key of the file is accounted for:
missing, unexpected and wrong-shaped ones fail with their lists.

--out becomes a workdir holding checkpoint step 0 (an Orbax train state, what
`python -m mrl_jax.evaluate`, `mrl_jax.inference.load` and
`--config.checkpoint.init_from` read), `config.json`, and `config.py`: the
experiment config (ImageNet's for ResNets and ViTs) with the detected settings.
.pt files are read without PyTorch (`mrl_jax/interop/torch_files.py`).
"""

import importlib
import json
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from configs import common
from mrl_jax import checkpointing, cli, experiment, optim, paths, sharding, steps
from mrl_jax.errors import ConfigError
from mrl_jax.interop import flat, timm_vit, torch_files, torchvision_resnet

FLAGS = flags.FLAGS
# kind → (converter module, the experiment config the model comes from)
KINDS = {"mrl_resnet50": (torchvision_resnet, "resnet50_i1k"),
         "torchvision_resnet": (torchvision_resnet, "resnet50_i1k"),
         "timm_vit": (timm_vit, "vit_b16_i1k")}
_CONFIG_PY = '''"""Written by `python -m mrl_jax.tools.import_weights` for {source}."""

from configs import common, {base}

OVERRIDES = {overrides!r}


def get_config(arg=None):
  return common.apply_overrides({base}.get_config(arg), OVERRIDES)
'''


def import_weights(path: str, kind: str, out: str, *, mode: Optional[str] = None,
                   num_classes: Optional[int] = None) -> Dict[str, Any]:
  """Converts `path` into the workdir `out` (see the module docstring); returns a summary."""
  if kind not in KINDS:
    raise ConfigError(f"--kind={kind!r}: choose one of {sorted(KINDS)}.")
  module, base = KINDS[kind]
  with paths.staged_read(path) as local:  # the file may be in a bucket
    state_dict = torch_files.load_state_dict(local)
  overrides = dict(module.detect(state_dict, mode=mode))
  if kind == "mrl_resnet50" and overrides.get("model.variant") != "50":
    raise ConfigError(f"{path} holds a ResNet{overrides.get('model.variant')}, not the "
                      "MRL ResNet50: use --kind=torchvision_resnet.")
  if num_classes:
    overrides["num_classes"] = int(num_classes)
  config = common.apply_overrides(_base_config(base), overrides)
  weights = module.to_flat(state_dict, config)  # every key accounted for, or an error
  weights, fresh_head = _with_fresh_head(weights, config)
  state, dims = _train_state(config, weights, source=path)
  if paths.listdir(paths.join(out, "checkpoints")):
    raise ConfigError(f"--out={out} already holds checkpoints; import into a new directory "
                      "(nothing there was changed).")
  checkpointing.check_writable(out)
  mesh = sharding.make_mesh(config.mesh)
  ckpt = checkpointing.Checkpointer(out, config, dims, mesh)
  ckpt.maybe_save(0, state, {}, force=True)
  ckpt.close()
  paths.write_text(paths.join(out, "config.json"), config.to_json_best_effort(indent=2))
  paths.write_text(paths.join(out, "config.py"), _CONFIG_PY.format(
      source=paths.as_path(path).name, base=base, overrides=_plain(overrides)))
  summary = {"out": out, "kind": kind, "arrays": len(weights), "overrides": _plain(overrides),
             "matryoshka_dims": [int(m) for m in dims], "fresh_head": fresh_head}
  logging.info("Imported %s (%s) into %s: %s", path, kind, out, summary)
  return summary


def _base_config(name: str):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config()


def _with_fresh_head(weights: Dict[str, np.ndarray], config: Any):
  """A backbone-only file (no classifier keys) gets the configured heads freshly
  initialised (zero kernels, as training starts them): ready to fine-tune or probe."""
  if any(name.startswith("params/head/") for name in weights):
    return weights, False
  _, params, _ = steps.split_model(experiment.model_factory(config)())
  head = {k: v for k, v in flat.flatten(params, {}).items() if k.startswith("params/head/")}
  logging.info("No classifier in the file: the %s head (%d classes, dims %s) starts fresh.",
               config.mrl.mode, config.num_classes, tuple(config.mrl.nesting))
  return {**weights, **head}, True


def _train_state(config: Any, weights: Dict[str, np.ndarray], *, source: str):
  """A step-0 train state holding `weights` (and a fresh optimizer state), on one device."""
  graphdef, params, model_state = flat.model_template(config)
  params, model_state = flat.into_state(weights, params, model_state, source=source)
  tx, _ = optim.make_optimizer(config.optim, 0, params)  # as restore.py builds it
  state = {"step": np.zeros((), np.int32), "params": params, "model_state": model_state,
           "opt_state": tx.init(params)}
  dims = nnx.merge(graphdef, params, model_state).head.dims
  return jax.tree.map(jax.numpy.asarray, state), tuple(dims)


def _plain(overrides: Dict[str, Any]) -> Dict[str, Any]:
  return {k: tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v
          for k, v in overrides.items()}


def main(argv) -> None:
  del argv
  summary = import_weights(FLAGS["from"].value, FLAGS.kind, FLAGS.out, mode=FLAGS.mode,
                           num_classes=FLAGS.num_classes)
  print(json.dumps(summary))


def _define_flags() -> None:
  flags.DEFINE_string("from", None, "The weight file (.pt, .pth or .safetensors).")
  flags.DEFINE_enum("kind", None, sorted(KINDS), "What the file holds.")
  flags.DEFINE_string("out", None, "The workdir to create.")
  flags.DEFINE_enum("mode", None, ["mrl", "mrl_e", "ff", "none"],
                    "Head mode, where the keys cannot tell (a plain 2048-wide fc).")
  flags.DEFINE_integer("num_classes", None, "Classes, for a file without a head.")
  flags.mark_flags_as_required(["from", "kind", "out"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
