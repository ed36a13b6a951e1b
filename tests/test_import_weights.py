"""import_weights → a workdir that inference, evaluation and fine-tuning read; export back.

The weight files are the PyTorch-made fixtures of tests/fixtures (the converters'
numerics against PyTorch are tests/test_interop_*.py); here the point is the
workdir: its checkpoint holds exactly the converted arrays, its config.py and
config.json describe the detected model, and exporting to the library's layout
gives the file back.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from configs import common
from mrl_jax import checkpoint_read, evaluators, inference, restore
from mrl_jax.errors import ConfigError, DataError, MissingFileError
from mrl_jax.interop import flat, timm_vit, torch_files
from mrl_jax.tools import export, import_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VIT_MRL = os.path.join(FIXTURES, "timm_vit_gap_mrl.safetensors")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("imported") / "vit")
  summary = import_weights.import_weights(VIT_MRL, "timm_vit", out)
  return out, summary


def test_the_workdir_holds_exactly_the_converted_weights(imported):
  out, summary = imported
  assert summary["matryoshka_dims"] == [8, 16, 32]
  model = inference.load(out)
  assert model.dims == (8, 16, 32) and model.step == 0 and model.config.mrl.mode == "mrl"
  want = timm_vit.to_flat(torch_files.load_state_dict(VIT_MRL), model.config)
  got = flat.flatten(model.params, model.model_state)
  assert sorted(got) == sorted(want)
  for name, array in want.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)
  images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), np.uint8)
  z = model.embed(images, dim=16)
  assert z.shape == (3, 16) and np.isfinite(z).all()


def test_config_py_rebuilds_the_detected_config(imported):
  out, _ = imported
  spec = importlib.util.spec_from_file_location("imported_config", os.path.join(out, "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  saved = json.loads(open(os.path.join(out, "config.json"), encoding="utf-8").read())
  assert (config.model.variant, config.num_classes, tuple(config.mrl.nesting)) == (
      "mu/8", 5, (8, 16, 32))
  assert saved["model"]["variant"] == "mu/8" and saved["input"]["image_size"] == 32
  # The ImageNet eval protocol at the detected 32 px, not the base config's 224.
  assert config.input.pp_eval == "decode|resize_small(36)|central_crop(32)|normalize(imagenet)"


def test_fine_tuning_reads_every_imported_parameter(imported):
  out, _ = imported
  model = inference.load(out)
  params, report = checkpoint_read.init_params(out, model.params)
  assert report[0].startswith("Initialised from") and " not loaded " not in "\n".join(report)
  for a, b in zip(flat.flatten(params, {}).values(), flat.flatten(model.params, {}).values()):
    np.testing.assert_array_equal(a, b)


def test_export_to_timm_gives_the_file_back(imported, tmp_path):
  out, _ = imported
  export.export(inference.load(out), str(tmp_path / "timm"), "timm")
  back = torch_files.load_state_dict(str(tmp_path / "timm" / inference.EXPORT_WEIGHTS))
  original = torch_files.load_state_dict(VIT_MRL)
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  meta = json.loads((tmp_path / "timm" / inference.EXPORT_CONFIG).read_text())
  assert meta["layout"] == "timm" and meta["matryoshka_dims"] == [8, 16, 32]
  with pytest.raises(ConfigError, match="torchvision exports ResNets"):
    export.export(inference.load(out), str(tmp_path / "tv"), "torchvision")


def test_bad_inputs_fail_with_one_clear_message(imported, tmp_path):
  out, _ = imported
  with pytest.raises(ConfigError, match="--kind='vit'"):
    import_weights.import_weights(VIT_MRL, "vit", str(tmp_path / "a"))
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(open(VIT_MRL, "rb").read()[:1000])
  with pytest.raises(DataError, match="truncated.safetensors"):
    import_weights.import_weights(str(truncated), "timm_vit", str(tmp_path / "b"))
  with pytest.raises(MissingFileError, match="No weight file"):
    import_weights.import_weights(str(tmp_path / "none.pt"), "timm_vit", str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="already holds checkpoints"):
    import_weights.import_weights(VIT_MRL, "timm_vit", out)


RESNET_MRL = os.path.join(FIXTURES, "torch_resnet50_w4_mrl.pt")


@pytest.mark.slow
def test_mrl_resnet50_imports_evaluates_and_exports_back_to_torchvision(tmp_path):
  """The published-model path: import the RAIVNLab/MRL layout (BlurPool, MRL heads,
  `module.` prefixes), evaluate the workdir with its config.py, export it back."""
  out = str(tmp_path / "r50")
  summary = import_weights.import_weights(RESNET_MRL, "mrl_resnet50", out)
  assert summary["overrides"]["model.options.blurpool"] is True
  spec = importlib.util.spec_from_file_location("r50_config", os.path.join(out, "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  # What `python -m mrl_jax.evaluate --config=<out>/config.py --workdir=<out>` does, on
  # generated images instead of ImageNet.
  common.apply_overrides(config, {"input.source": "synthetic", "input.image_size": 64,
                                  "input.synthetic_sizes.val": 16, "input.eval_batch_size": 16,
                                  "input.workers": 0, "model.dtype": "float32"})
  run = restore.load_run(config, out)
  assert run.step == 0 and run.dims == tuple(summary["matryoshka_dims"])
  evals = evaluators.build_evaluators(config, dims=run.dims, only=["classification"])
  with restore.RoundFunctions(run, str(tmp_path / "eval")) as fns:
    ctx = evaluators.EvalContext(run.step, run.dims, run.mesh, fns.embed_split, fns.apply_heads)
    result = evaluators.run_evaluators(ctx, evals)[0]
  assert len(result.metrics["top1"]) == len(run.dims)

  export.export(inference.load(out), str(tmp_path / "tv"), "torchvision")
  back = torch_files.load_state_dict(str(tmp_path / "tv" / inference.EXPORT_WEIGHTS))
  original = torch_files.load_state_dict(RESNET_MRL)  # `module.` stripped on reading
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    if not key.endswith("num_batches_tracked"):  # a counter torchvision ignores in eval
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_a_backbone_only_file_gets_fresh_heads(tmp_path):
  state_dict = torch_files.load_state_dict(os.path.join(FIXTURES, "timm_vit_cls.safetensors"))
  backbone = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
  torch_files.save_safetensors(backbone, str(tmp_path / "backbone.safetensors"))
  summary = import_weights.import_weights(str(tmp_path / "backbone.safetensors"), "timm_vit",
                                          str(tmp_path / "out"), num_classes=7)
  assert summary["fresh_head"] and summary["matryoshka_dims"] == [8, 16, 32]
  model = inference.load(str(tmp_path / "out"))
  assert model.config.num_classes == 7
  heads = {k: v for k, v in flat.flatten(model.params, {}).items() if "/head/" in k}
  assert heads and all(not v.any() for k, v in heads.items() if k.endswith("kernel"))
  want = timm_vit.to_flat(backbone, model.config)
  got = flat.flatten(model.params, model.model_state)
  for name, array in want.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)
