"""Import of torchvision / MRL-reference ResNet weights: our forward equals PyTorch's.

The reference is tests/fixtures/torch_resnet50_w4_mrl.{pt,npz}, written by
tests/fixtures/make_torch_resnet_fixture.py with real torch: a torchvision-layout
ResNet50 at base width 4 with the reference's BlurPool and MRL heads, random weights
and BN statistics, channels_last, DDP `module.` keys. torch is not needed here (it is a
multi-GB dependency, not in CI); with torch installed, the comparison also runs live on
models of other seeds and heads.

Tolerance: float32 forwards of this net differ from float64 by ~2e-4 at logits of
magnitude ~150 (torch's own f32-vs-f64 gap is the same size), so logits must agree
within 1e-5 of the largest logit (~1.5e-3 here); the measured gap is printed.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import resnet50_i1k
from mrl_jax import experiment, steps
from mrl_jax.errors import ConfigError
from mrl_jax.interop import flat, torch_files
from mrl_jax.interop import torchvision_resnet as tvr
from mrl_jax.models import resnet

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAME = "torch_resnet50_w4_mrl"
RTOL_OF_SCALE = 1e-5


def _config(overrides):
  c = resnet50_i1k.get_config("runlocal")
  c.model.dtype = "float32"
  c.update_from_flattened_dict(dict(overrides))
  return c


_FORWARDS = {}  # config -> (abstract params, model_state, jitted forward): compile once


def _forward(weights, config, images_nchw):
  """(z, logits [M, B, L]) of our eval forward on the torch input (NCHW -> NHWC)."""
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _FORWARDS:
    graphdef, params, model_state = steps.split_model(
        nnx.eval_shape(experiment.model_factory(config)))
    _FORWARDS[key] = (params, model_state, jax.jit(
        lambda p, s, x: nnx.merge(graphdef, p, s)(x, train=False)))
  params, model_state, fwd = _FORWARDS[key]
  params, model_state = flat.into_state(weights, params, model_state, source="test")
  z, logits = fwd(params, model_state, np.transpose(images_nchw, (0, 2, 3, 1)))
  return np.asarray(z), np.asarray(logits)


def _assert_matches(ours, ref, what):
  scale = max(1.0, float(np.abs(ref).max()))
  gap = float(np.abs(ours - ref).max())
  print(f"{what}: max |ours - torch| = {gap:.3g} at |max| {scale:.3g}")
  assert ours.shape == ref.shape
  assert gap <= RTOL_OF_SCALE * scale, f"{what}: {gap} > {RTOL_OF_SCALE} x {scale}"


@pytest.fixture(scope="module")
def fixture():
  sd = torch_files.load_state_dict(os.path.join(FIXTURES, f"{NAME}.pt"))
  ref = dict(np.load(os.path.join(FIXTURES, f"{NAME}.npz")))
  config = _config(tvr.detect(sd))
  return sd, ref, config, tvr.to_flat(sd, config)


def test_detect_reads_the_published_layout(fixture):
  sd, ref, _, _ = fixture
  assert tvr.detect(sd) == {
      "model.name": "resnet", "model.variant": "50", "model.neck_dim": 0,
      "model.options.width": 4, "model.options.stem": "imagenet",
      "model.options.blurpool": True, "model.options.representation": "relu",
      "num_classes": 10, "mrl.mode": "mrl", "mrl.nesting": tuple(ref["nesting"]),
      "mrl.ff_dim": 0}
  # The reference blurs strided convs of >= 16 input channels: at width 4 every one
  # but layer2.0.conv2 (8 channels), which the importer and the model both know.
  blurred = sorted(k[:-len(".blur_filter")] for k in sd if k.endswith(".blur_filter"))
  assert blurred == ["layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                     "layer4.0.conv2", "layer4.0.downsample.0"]
  assert "layer2.0.conv2.weight" in sd


def test_blurpool_keeps_the_parameters_and_blurs_by_the_reference_rule():
  build = lambda blurpool: nnx.eval_shape(lambda: resnet.ResNet(
      "18", rngs=nnx.Rngs(0), width=8, blurpool=blurpool))
  plain, blurred = build(False), build(True)
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m))
  assert shapes(plain) == shapes(blurred)
  convs = {"/".join(map(str, p)): resnet.blurs(n, True) for p, n in nnx.iter_graph(blurred)
           if isinstance(n, nnx.Conv)}
  # Strided convs of >= 16 input channels; a BasicBlock strides on conv1.
  assert sorted(k for k, b in convs.items() if b) == [
      "stages/2/blocks/0/conv1", "stages/2/blocks/0/proj_conv",
      "stages/3/blocks/0/conv1", "stages/3/blocks/0/proj_conv"]
  assert not convs["stem_conv"]  # 3 input channels
  assert not convs["stages/1/blocks/0/conv1"] and not convs["stages/1/blocks/0/proj_conv"]  # 8
  x = np.ones((1, 5, 5, 2), np.float32)
  y = np.asarray(resnet.blur(x))
  np.testing.assert_allclose(y[0, 1:-1, 1:-1], 1.0)  # a low-pass keeps a constant ...
  np.testing.assert_allclose(y[0, 0, 0], 9 / 16)      # ... and zero-pads the border


def test_logits_at_every_nesting_dim_match_pytorch(fixture):
  sd, ref, config, weights = fixture
  z, logits = _forward(weights, config, ref["images"])
  _assert_matches(z, ref["z"], "z")
  for i, m in enumerate(ref["nesting"]):
    _assert_matches(logits[i], ref["logits"][i], f"logits at d={m}")
  assert (logits.argmax(-1) == ref["logits"].argmax(-1)).all()


def test_export_is_the_inverse_of_import(fixture):
  sd, _, config, weights = fixture
  back = tvr.from_flat(weights, config)
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
    if k.endswith("num_batches_tracked"):  # a counter, not a weight: exported as 0
      assert back[k] == 0
    else:
      np.testing.assert_array_equal(back[k], v, err_msg=k)


def _with_head(sd, head):
  """The fixture's backbone with a synthesized classifier {key: shape}."""
  out = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  rng = np.random.default_rng(0)
  out.update({k: rng.normal(size=s).astype(np.float32) for k, s in head.items()})
  return out


_MRL_FROM_16 = {f"fc.nesting_classifier_{i}.{p}": ((5, m) if p == "weight" else (5,))
                for i, m in enumerate((16, 32, 64, 128)) for p in ("weight", "bias")}


@pytest.mark.parametrize("head, mode, want, imports", [
    ({"fc.nesting_classifier_0.weight": (7, 128), "fc.nesting_classifier_0.bias": (7,)}, None,
     {"mrl.mode": "mrl_e", "mrl.nesting": (8, 16, 32, 64, 128), "num_classes": 7}, True),
    ({"fc.weight": (7, 32), "fc.bias": (7,)}, None,
     {"mrl.mode": "ff", "mrl.ff_dim": 32, "num_classes": 7}, True),
    ({"fc.weight": (7, 128), "fc.bias": (7,)}, "mrl_e",
     {"mrl.mode": "mrl_e", "mrl.ff_dim": 0}, True),
    ({"fc.weight": (7, 128), "fc.bias": (7,)}, "ff", {"mrl.mode": "ff", "mrl.ff_dim": 128}, False),
    ({"fc.weight": (1000, 128), "fc.bias": (1000,)}, "none",
     {"mrl.mode": "none", "num_classes": 1000}, False),
    (_MRL_FROM_16, None, {"mrl.mode": "mrl", "mrl.nesting": (16, 32, 64, 128)}, False),
], ids=["mrl_e", "ff32", "old_mrl_e", "ff_d", "plain", "mrl_from_16"])
def test_heads_are_detected(fixture, head, mode, want, imports):
  sd = _with_head(fixture[0], head)
  found = tvr.detect(sd, mode)
  assert {k: found[k] for k in want} == want
  if imports:  # the tied / single classifier: our head/linear kernel is the weight, transposed
    weights = tvr.to_flat(sd, _config(found))
    weight = "fc.weight" if "fc.weight" in head else "fc.nesting_classifier_0.weight"
    np.testing.assert_array_equal(weights["params/head/linear/kernel"], sd[weight].T)


def test_a_single_full_width_fc_needs_the_mode(fixture):
  sd = _with_head(fixture[0], {"fc.weight": (7, 128), "fc.bias": (7,)})
  with pytest.raises(ConfigError, match=r"--mode=mrl_e\|ff"):
    tvr.detect(sd)
  with pytest.raises(ConfigError, match="--mode=mrl_e"):
    tvr.detect(sd, "mrl")


def test_another_architecture_is_refused_with_its_keys(fixture):
  vit = {"cls_token": np.zeros((1, 1, 64)), "pos_embed": np.zeros((1, 17, 64)),
         "patch_embed.proj.weight": np.zeros((64, 3, 8, 8)),
         "blocks.0.attn.qkv.weight": np.zeros((192, 64)), "head.weight": np.zeros((10, 64))}
  with pytest.raises(ConfigError, match=r"not a torchvision-layout ResNet.*blocks\.0\.attn"):
    tvr.detect(vit)
  with pytest.raises(ConfigError, match=r"unexpected \(blocks\.0\.attn\.qkv\.weight, cls_token"):
    tvr.to_flat(vit, fixture[2])


def test_a_config_that_does_not_fit_lists_the_torch_keys(fixture):
  sd, _, config, _ = fixture
  plain = config.copy_and_resolve_references()
  plain.model.options.blurpool = False
  with pytest.raises(ConfigError) as e:
    tvr.to_flat(sd, plain)
  msg = str(e.value)
  assert "5 missing (layer2.0.downsample.0.weight" in msg
  assert "10 unexpected (layer2.0.downsample.0.blur_filter" in msg
  assert "model.options.blurpool=True (configured: False)" in msg
  bad = dict(sd)
  bad["layer3.0.conv2.blur_filter"] = bad["layer3.0.conv2.blur_filter"] * 2
  with pytest.raises(ConfigError, match=r"layer3\.0\.conv2\.blur_filter is not the fixed"):
    tvr.to_flat(bad, config)


def test_composer_blur_max_pool_is_refused(fixture):
  sd = dict(fixture[0], **{"maxpool.filt2d": np.zeros((1, 1, 3, 3), np.float32)})
  with pytest.raises(ConfigError, match="BlurMaxPool2d"):
    tvr.detect(sd)


@pytest.mark.parametrize("seed, head", [(1, "mrl"), (2, "mrl_e")])
def test_live_against_torch(tmp_path, seed, head):
  """Other seeds, and the tied MRL-E head's forward, against torch itself."""
  pytest.importorskip("torch")
  # pylint: disable-next=import-outside-toplevel
  from tests.fixtures import make_torch_resnet_fixture as maker
  model = maker.build(seed=seed, head=head)
  images, z_ref, logits_ref = maker.reference(model, seed=seed)
  path = tmp_path / "model.pt"
  maker.save_state_dict(model, path)
  sd = torch_files.load_state_dict(str(path))
  config = _config(tvr.detect(sd))
  assert config.mrl.mode == head
  z, logits = _forward(tvr.to_flat(sd, config), config, images)
  _assert_matches(z, z_ref, f"seed {seed} z")
  _assert_matches(logits, logits_ref, f"seed {seed} {head} logits")


@pytest.mark.parametrize("variant", ["18", "34"])
def test_basic_block_resnets_map_to_torchvision_names_and_back(variant):
  """ResNet18/34 (basic blocks, no conv3): our variables ↔ torchvision's key names."""
  config = _config({"model.variant": variant, "model.options.width": 4,
                    "mrl.nesting": (8, 16, 32), "num_classes": 3})
  _, params, model_state = steps.split_model(experiment.model_factory(config)())
  ours = flat.flatten(params, model_state)
  torch_layout = tvr.from_flat(ours, config)
  blocks = {"18": (2, 2, 2, 2), "34": (3, 4, 6, 3)}[variant]
  want = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}
  for stage, count in enumerate(blocks, start=1):
    for b in range(count):
      want |= {f"layer{stage}.{b}.conv{i}.weight" for i in (1, 2)}
  assert want <= set(torch_layout)
  assert not any(k.endswith("conv3.weight") for k in torch_layout)
  assert torch_layout["layer2.0.downsample.0.weight"].shape == (8, 4, 1, 1)  # OIHW
  assert tvr.detect(torch_layout)["model.variant"] == variant
  back = tvr.to_flat(torch_layout, config)
  assert sorted(back) == sorted(ours)
  for name, array in ours.items():
    np.testing.assert_array_equal(back[name], array, err_msg=name)
