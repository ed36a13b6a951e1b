"""The sharded step on 8 fake CPU devices equals the single-device step; mesh layouts."""

import types

import jax
import numpy as np
import pytest

from configs import common, demo
from mrl_jax import experiment, sharding
from mrl_jax.data import pipeline, preprocess, synthetic
from mrl_jax.errors import ConfigError


def _config(model):
  c = demo.get_config("runlocal,synthetic")
  # A narrow ResNet18 with its neck: the same layers to shard, 1/16 of the FLOPs.
  c.model.options, c.model.neck_dim, c.mrl.nesting = {"width": 16}, 64, (2, 8, 64)
  if model == "vit":  # no BatchNorm, dropout on: rng state must shard too
    c.model.name, c.model.variant = "vit", "mu/4"
    c.model.options, c.model.neck_dim = {"dropout": 0.1}, 0
    c.mrl.nesting, c.mrl.mode = (4, 8, 16, 32), "mrl_e"
    c.optim.clip_norm = 1.0
  c.input.image_size = 16
  c.optim.name, c.optim.lr, c.optim.weight_decay = "sgd", 0.05, 1e-4
  c.mrl.label_smoothing = 0.1
  return c


def _run(config, mesh_shape, devices, num_steps=2, microbatches=1):
  """Trains `num_steps` on fixed batches; returns losses and final params (numpy)."""
  config.microbatches = microbatches
  exp = experiment.build_experiment(config, sharding.make_mesh(mesh_shape, devices), 10)
  state = exp.state
  source = synthetic.SyntheticSource(config.input, "train", num_classes=config.num_classes)
  batches = pipeline.train_iterator(
      source, preprocess.parse("decode|resize(16)", num_classes=config.num_classes),
      global_batch=16, seed=0, num_classes=config.num_classes)
  losses = []
  for _ in range(num_steps):
    batch = pipeline.to_global(next(batches), exp.batch_sharding)
    state, metrics = exp.train_step(state, batch)
    losses.append(np.asarray(metrics["loss_per_dim"]))
  return np.stack(losses), state


MESHES = {
    "data8": {"data": 8, "fsdp": 1, "model": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "model": 1},
    "mixed": {"data": 2, "fsdp": 2, "model": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_sharded_step_equals_single_device(model):
  config = _config(model)
  ref_losses, ref_state = _run(config, {"data": 1}, jax.devices()[:1])
  ref_params = jax.tree.leaves(jax.device_get(ref_state["params"]))
  for name, mesh_shape in MESHES.items():
    losses, state = _run(config, mesh_shape, jax.devices())
    # Same maths, different reduction order over devices: float32 round-off only.
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-4, atol=2e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), ref_params):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5, err_msg=name)
    if name == "fsdp8":
      specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
      assert any("fsdp" in s for s in specs), specs  # parameters really are split
    if name == "mixed" and model == "resnet":
      head = state["params"]["head"]["heads"][0]["kernel"]
      assert head.sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_microbatches_equal_full_batch_without_batchnorm():
  config = _config("vit")
  config.model.options = {}
  full, _ = _run(config, {"data": 1}, jax.devices()[:1], num_steps=2)
  accumulated, _ = _run(config, {"data": 1}, jax.devices()[:1], num_steps=2, microbatches=4)
  np.testing.assert_allclose(accumulated, full, rtol=2e-4, atol=2e-5)
  sharded, _ = _run(config, MESHES["data8"], jax.devices(), num_steps=2, microbatches=2)
  np.testing.assert_allclose(sharded, full, rtol=2e-4, atol=2e-5)


def test_mesh_errors_name_the_fix():
  with pytest.raises(ValueError, match="8 are available"):
    sharding.make_mesh({"data": 2, "fsdp": 2, "model": 1})
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1, "model": 1})
  with pytest.raises(ValueError, match="not divisible"):
    sharding.make_mesh({"data": -1, "fsdp": 3, "model": 1})
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}


def _fake_devices(slice_of, process_of, count=8):
  """Stand-ins with what a device layout reads (a TPU's slice_index included)."""
  return [types.SimpleNamespace(id=i, slice_index=slice_of(i), process_index=process_of(i),
                                platform="cpu", device_kind="fake") for i in range(count)]


def test_dcn_data_puts_one_slice_per_block_of_the_data_axis():
  plain = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1, "dcn_data": 1})
  assert plain.devices.tolist() == jax.make_mesh((4, 2, 1), sharding.MESH_AXES).devices.tolist()

  # 2 TPU slices of 4 devices (2 hosts each), listed out of order.
  devices = _fake_devices(lambda i: i // 4, lambda i: i // 2)[::-1]
  grid = sharding.device_grid({"data": -1, "fsdp": 2, "model": 1, "dcn_data": 2}, devices)
  assert grid.shape == (4, 2, 1)  # 'data' = dcn_data 2 × data 2 per slice
  assert [d.slice_index for d in grid[:, 0, 0]] == [0, 0, 1, 1]  # slices outermost
  assert all(len({d.slice_index for d in grid[i].flat}) == 1 for i in range(4))  # fsdp inside
  # Processes as the slices (auto, where the devices have no slice_index: CPU, GPU).
  grid = sharding.device_grid({"data": 1, "fsdp": -1, "model": 1, "dcn_data": 4,
                               "dcn_granule": "process"}, devices)
  assert [[d.process_index for d in grid[i].flat] for i in range(4)] == [[0, 0], [1, 1],
                                                                         [2, 2], [3, 3]]


def test_dcn_errors_name_the_fix():
  with pytest.raises(ConfigError, match=r"mesh.dcn_data=2, but the devices are in 1 process,"
                     r".*Set --config.mesh.dcn_data=1"):
    sharding.make_mesh({"data": -1, "dcn_data": 2})  # this one process: one slice
  devices = _fake_devices(lambda i: i // 4, lambda i: i // 2)
  with pytest.raises(ConfigError, match=r"span 2 TPU slices: set --config.mesh.dcn_data=2"):
    sharding.make_mesh({"data": -1}, devices)  # jax.make_mesh cannot lay out two slices
  with pytest.raises(ConfigError, match=r"in 2 TPU slices, .*dcn_data=2 .*, or "
                     r"--config.mesh.dcn_granule=process\."):
    sharding.device_grid({"data": -1, "dcn_data": 4}, devices)
  with pytest.raises(ConfigError, match=r"has 3 devices but 4 are in each of the 2 TPU slices"):
    sharding.device_grid({"data": 1, "fsdp": 3, "dcn_data": 2}, devices)
  with pytest.raises(ConfigError, match=r"dcn_granule='node'"):
    sharding.device_grid({"dcn_data": 2, "dcn_granule": "node"}, devices)
  uneven = _fake_devices(lambda i: int(i >= 3), lambda i: 0)
  with pytest.raises(ConfigError, match=r"different numbers of devices \(\[3, 5\]\)"):
    sharding.device_grid({"data": -1, "dcn_data": 2}, uneven)


def test_rules_fall_back_to_fsdp_when_a_spec_does_not_fit():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  rules = common.get_base_config().sharding_rules
  P = jax.sharding.PartitionSpec
  assert sharding.spec_for("params/head/linear/kernel", (64, 10), mesh, rules) == P(None, "model")
  # 7 classes do not split over model=2: the leaf falls back to fsdp on its largest dim.
  assert sharding.spec_for("params/head/linear/kernel", (64, 7), mesh, rules) == P("fsdp", None)
  assert sharding.spec_for("params/backbone/conv/kernel", (3, 3, 8, 64), mesh, rules) == \
      P(None, None, None, "fsdp")
  assert sharding.spec_for("params/backbone/norm/scale", (6,), mesh, rules) == P()
  assert sharding.spec_for("x", (8,), mesh, [(".*", "replicate")]) == P()
