"""timm ViT import (mrl_jax.interop.timm_vit) against PyTorch outputs saved in tests/fixtures.

The fixtures (tests/fixtures/make_timm_vit_fixture.py, checked there against timm's
own VisionTransformer) are reduced ViTs of our "mu/8" size, one per pool and head
layout; torch is not needed here.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import vit_b16_i1k
from mrl_jax import experiment, steps
from mrl_jax.errors import ConfigError
from mrl_jax.interop import flat, timm_vit
from mrl_jax.interop.torch_files import load_state_dict

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NESTING = (8, 16, 32)
# name -> what detect must find (the fixture script's three models).
_MU8 = {"model.name": "vit", "model.variant": "mu/8", "model.neck_dim": 0,
        "input.image_size": 32, "mrl.nesting": NESTING, "mrl.ff_dim": 0, "num_classes": 5}
DETECTED = {
    "cls": {**_MU8, "model.options.pool": "cls", "mrl.mode": "none"},
    "gap_mrl": {**_MU8, "model.options.pool": "gap", "mrl.mode": "mrl"},
    "map_mrle": {**_MU8, "model.options.pool": "map", "mrl.mode": "mrl_e"},
}
# float32 on both sides; measured max |diff| <= 5e-7 (z and logits of magnitude ~1-3).
ATOL = 2e-5


def _state_dict(name):
  return load_state_dict(os.path.join(FIXTURES, f"timm_vit_{name}.safetensors"))


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURES, "timm_vit_reference.npz")))


def _config(overrides):
  c = vit_b16_i1k.get_config()
  c.model.dtype = "float32"
  c.update_from_flattened_dict(dict(overrides))
  return c


def _forward(config, flat_weights, images_nchw):
  """Our eval forward on float images (no uint8 normalisation): (z, logits [M, B, L])."""
  graphdef, params, model_state = steps.split_model(
      experiment.build_classifier(config, rngs=nnx.Rngs(0)))
  params, model_state = flat.into_state(flat_weights, params, model_state, source="test")
  images = np.transpose(images_nchw, (0, 2, 3, 1))  # NCHW -> NHWC
  return jax.device_get(nnx.merge(graphdef, params, model_state)(images, train=False))


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_detect_reads_the_fixture(name):
  assert timm_vit.detect(_state_dict(name)) == DETECTED[name]


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_logits_match_pytorch(name, reference):
  sd = _state_dict(name)
  config = _config(timm_vit.detect(sd))
  z, logits = _forward(config, timm_vit.to_flat(sd, config), reference["images"])
  diff_z = np.abs(z - reference[f"{name}_z"]).max()
  diff_logits = np.abs(logits - reference[f"{name}_logits"]).max()
  print(f"{name}: max |diff| z {diff_z:.2e}, logits {diff_logits:.2e}")
  assert logits.shape == reference[f"{name}_logits"].shape
  assert diff_z < ATOL and diff_logits < ATOL


def test_ff_head_reads_a_prefix(reference):
  """timm's head at k < D features is FF-k; its logits are z[:, :k] W^T + b."""
  sd = _state_dict("cls")
  sd["head.weight"] = np.ascontiguousarray(sd["head.weight"][:, :16])
  overrides = timm_vit.detect(sd)
  assert (overrides["mrl.mode"], overrides["mrl.ff_dim"]) == ("ff", 16)
  config = _config(overrides)
  _, logits = _forward(config, timm_vit.to_flat(sd, config), reference["images"])
  expected = reference["cls_z"][:, :16] @ sd["head.weight"].T + sd["head.bias"]
  np.testing.assert_allclose(logits[0], expected, atol=ATOL)


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_round_trip_is_exact(name):
  sd = _state_dict(name)
  config = _config(timm_vit.detect(sd))
  back = timm_vit.from_flat(timm_vit.to_flat(sd, config), config)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_backbone_only_state_dict():
  """timm's num_classes=0: no head keys, so no head overrides and no params/head names."""
  sd = {k: v for k, v in _state_dict("cls").items() if not k.startswith("head.")}
  overrides = timm_vit.detect(sd)
  assert "num_classes" not in overrides and "mrl.mode" not in overrides
  assert timm_vit.detect(sd, "mrl")["mrl.mode"] == "mrl"
  config = _config({**overrides, "num_classes": 7, "mrl.mode": "mrl"})
  weights = timm_vit.to_flat(sd, config)
  expected = {k for k in flat.expected_shapes(config) if not k.startswith("params/head/")}
  assert set(weights) == expected
  back = timm_vit.from_flat(weights, config)
  assert sorted(back) == sorted(sd)


def test_resnet_state_dict_is_refused():
  resnet = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
            "bn1.weight": np.zeros(64, np.float32), "bn1.running_mean": np.zeros(64, np.float32),
            "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32),
            "fc.weight": np.zeros((5, 2048), np.float32), "fc.bias": np.zeros(5, np.float32)}
  with pytest.raises(ConfigError, match="not a timm ViT"):
    timm_vit.detect(resnet)
  with pytest.raises(ConfigError) as err:
    timm_vit.to_flat(resnet, _config(DETECTED["cls"]))
  message = str(err.value)
  assert "6 unexpected (bn1.running_mean, bn1.weight, conv1.weight, fc.bias, fc.weight" in message
  assert "missing (" in message and "blocks.0.attn.qkv.bias" in message


def test_wrong_shapes_and_extra_keys_are_listed():
  sd = _state_dict("cls")
  with pytest.raises(ConfigError) as err:
    timm_vit.to_flat(sd, _config({**DETECTED["cls"], "num_classes": 7}))
  message = str(err.value)
  assert "2 wrong-shaped (head.bias: (5,) instead of (7,), head.weight: (5, 32) instead of " \
         "(7, 32))" in message
  assert "The file reads as: num_classes=5 (configured: 7)." in message
  sd["blocks.0.ls1.gamma"] = np.ones(32, np.float32)  # a key no rule consumes
  with pytest.raises(ConfigError) as err:
    timm_vit.to_flat(sd, _config(DETECTED["cls"]))
  assert "1 unexpected (blocks.0.ls1.gamma)" in str(err.value)
  assert "layer scale" in str(err.value)  # detect's reason, appended


def test_mode_reads_a_plain_head_as_mrl_e_or_ff():
  sd = _state_dict("cls")
  assert timm_vit.detect(sd, "ff")["mrl.ff_dim"] == 32
  overrides = timm_vit.detect(sd, "mrl_e")
  assert overrides == {**DETECTED["cls"], "mrl.mode": "mrl_e"}
  config = _config(overrides)
  weights = timm_vit.to_flat(sd, config)
  np.testing.assert_array_equal(weights["params/head/linear/kernel"], sd["head.weight"].T)
  back = timm_vit.from_flat(weights, config)  # written as MRL_Linear_Layer(efficient=True)
  np.testing.assert_array_equal(back["head.nesting_classifier_0.weight"], sd["head.weight"])
  assert "head.weight" not in back
  with pytest.raises(ConfigError, match="not separate MRL heads"):
    timm_vit.detect(sd, "mrl")
  with pytest.raises(ConfigError, match="mode 'mrl', not 'none'"):
    timm_vit.detect(_state_dict("gap_mrl"), "none")


@pytest.mark.parametrize("extra, reason", [
    ({"fc_norm.weight": (32,)}, "fc_norm"),
    ({"reg_token": (1, 4, 32)}, "register tokens"),
    ({"blocks.0.ls1.gamma": (32,)}, "layer scale"),
    ({"norm_pre.weight": (32,)}, "norm_pre"),
    ({"pos_embed": (1, 16, 32)}, "no_embed_class"),
])
def test_unsupported_timm_options_are_named(extra, reason):
  shapes = {k: v.shape for k, v in _state_dict("cls").items()}
  with pytest.raises(ConfigError, match=reason):
    timm_vit.detect({**_shaped(shapes), **_shaped(extra)})


def _shaped(shapes):
  """Stand-ins for tensors: zero-stride arrays of the shapes, no memory behind them."""
  return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def _timm_vit_b16_shapes():
  """timm 1.0's vit_base_patch16_224 state dict: keys and shapes (152 entries)."""
  d, mlp = 768, 3072
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d),
            "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,)}
  for i in range(12):
    b = f"blocks.{i}."
    shapes.update({
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
        b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)})
  shapes.update({"norm.weight": (d,), "norm.bias": (d,),
                 "head.weight": (1000, d), "head.bias": (1000,)})
  return shapes


def test_vit_b16_is_detected_and_fits_our_b16():
  sd = _shaped(_timm_vit_b16_shapes())
  overrides = timm_vit.detect(sd)
  assert overrides == {"model.name": "vit", "model.variant": "B/16", "model.neck_dim": 0,
                       "input.image_size": 224, "model.options.pool": "cls",
                       "num_classes": 1000, "mrl.mode": "none", "mrl.ff_dim": 0,
                       "mrl.nesting": (12, 24, 48, 96, 192, 384, 768)}
  config = vit_b16_i1k.get_config()
  config.update_from_flattened_dict(overrides)
  # Views of the stand-ins, nothing allocated; to_flat checks every name and shape.
  weights = timm_vit.to_flat(sd, config)
  assert len(weights) == 152 + 4 * 12  # each qkv weight and bias gives 3
  assert weights["params/backbone/patch_embed/kernel"].shape == (16, 16, 3, 768)
  assert weights["params/backbone/blocks/11/attn/value/kernel"].shape == (768, 768)
