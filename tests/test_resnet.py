"""Tests for the ResNet backbones: torchvision parity, BN semantics, dtypes, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import build_backbone
from mrl_jax.models.resnet import ResNet

# torchvision's `sum(p.numel() for p in resnetX().parameters())`, with fc head.
_TORCHVISION_PARAMS = {
    "18": 11_689_512,
    "34": 21_797_672,
    "50": 25_557_032,
    "101": 44_549_160,
    "152": 60_192_808,
}


def _abstract(variant: str) -> ResNet:
  # Shapes only: no weights are allocated and no RNG is run.
  return nnx.eval_shape(lambda: ResNet(variant, rngs=nnx.Rngs(0)))


def _leaves(model: nnx.Module, kind) -> list:
  return jax.tree.leaves(nnx.state(model, kind))


@pytest.fixture(scope="module")
def models():
  """Lazily built, shared models: initialising a ResNet50 eagerly takes seconds."""
  cache = {}

  def get(variant: str) -> ResNet:
    if variant not in cache:
      cache[variant] = ResNet(variant, rngs=nnx.Rngs(0), zero_init_last_bn=False)
    return cache[variant]

  return get


def _images(batch: int = 2, size: int = 64, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.mark.parametrize("variant", sorted(_TORCHVISION_PARAMS, key=int))
def test_param_count_matches_torchvision(variant):
  model = _abstract(variant)
  backbone = sum(int(np.prod(x.shape)) for x in _leaves(model, nnx.Param))
  head = model.embed_dim * 1000 + 1000
  assert backbone + head == _TORCHVISION_PARAMS[variant]
  assert model.embed_dim == (512 if variant in ("18", "34") else 2048)


def test_param_names_are_readable():
  model = _abstract("50")
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
  for expected in ("stem_conv/kernel", "stem_bn/scale", "stem_bn/mean",
                   "stages/0/blocks/0/conv1/kernel", "stages/0/blocks/0/proj_conv/kernel",
                   "stages/3/blocks/2/bn3/scale"):
    assert expected in paths
  # v1.5: the stride-2 3x3 conv is the second one of the downsampling bottleneck.
  block = model.stages[1].blocks[0]
  assert block.conv2.strides == (2, 2) and block.conv1.strides == (1, 1)


def test_feature_map_shapes_match_torchvision_at_224():
  graphdef, state = nnx.split(_abstract("50"))
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  # Traced only (abstract inputs), so this costs no FLOPs.
  jaxpr = jax.make_jaxpr(
      lambda state, x: nnx.merge(graphdef, state, copy=True)(x, train=False))(state, x)
  convs = [e.outvars[0].aval.shape for e in jaxpr.jaxpr.eqns
           if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1 + 16 * 3 + 4  # stem, 16 bottlenecks, 4 projections.
  assert convs[0] == (1, 112, 112, 64) and convs[-1] == (1, 7, 7, 2048)
  assert (1, 56, 56, 256) in convs and (1, 14, 14, 1024) in convs
  assert jaxpr.out_avals[0].shape == (1, 2048)


def test_zero_init_last_bn():
  model = ResNet("18", rngs=nnx.Rngs(0), in_channels=1)
  assert model.stem_conv.kernel.shape == (7, 7, 1, 64)
  for stage in model.stages:
    for block in stage.blocks:
      np.testing.assert_array_equal(block.bn2.scale[...], 0.0)
      np.testing.assert_array_equal(block.bn1.scale[...], 1.0)


@pytest.mark.parametrize("variant", ["18", "50"])
def test_eval_forward_shape_and_batch_independence(models, variant):
  model = models(variant)
  x = _images(batch=2)
  y = model(x, train=False)
  assert y.shape == (2, model.embed_dim) and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
  # Replacing the second example must not change the first one's output.
  x_other = x.at[1].set(_images(batch=1, seed=1)[0])
  y_other = model(x_other, train=False)
  np.testing.assert_allclose(y[0], y_other[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y[1], y_other[1])


@pytest.mark.parametrize("variant", ["18", "50"])
def test_train_updates_batch_stats_eval_does_not(models, variant):
  model = nnx.clone(models(variant))
  x = _images(batch=2)
  before = [np.asarray(v) for v in _leaves(model, nnx.BatchStat)]
  y = model(x, train=True)
  assert y.shape == (2, model.embed_dim) and bool(jnp.all(jnp.isfinite(y)))
  after_train = [np.asarray(v) for v in _leaves(model, nnx.BatchStat)]
  assert all(not np.array_equal(b, a) for b, a in zip(before, after_train))
  model(x, train=False)
  after_eval = _leaves(model, nnx.BatchStat)
  for a, b in zip(after_train, after_eval):
    np.testing.assert_array_equal(a, b)


def test_bf16_compute_keeps_f32_params_and_output():
  model = ResNet("18", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in _leaves(model, nnx.Param))
  x = _images(batch=2, size=32)
  jaxpr = jax.make_jaxpr(lambda x: model(x, train=False))(x)
  conv_dtypes = {eqn.outvars[0].aval.dtype for eqn in jaxpr.jaxpr.eqns
                 if eqn.primitive.name == "conv_general_dilated"}
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
  y = model(x, train=True)
  assert y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
  assert all(p.dtype == jnp.float32 for p in _leaves(model, nnx.Param))


def _loss_and_grads(remat: bool, x: jax.Array):
  model = ResNet("18", rngs=nnx.Rngs(0), remat=remat, zero_init_last_bn=False)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, x):
    # copy=True: under jax.grad, flax 0.12.8 refuses to mutate BatchStats that
    # merge would otherwise reuse from outside the trace (TraceContextError).
    m = nnx.merge(graphdef, params, rest, copy=True)
    y = m(x, train=True)
    return jnp.sum(y**2), (y, nnx.state(m, nnx.BatchStat))

  eqns = jax.make_jaxpr(loss_fn)(params, rest, x).jaxpr.eqns
  num_remat = sum(e.primitive.name in ("checkpoint", "remat2") for e in eqns)
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (y, stats)), grads = step(params, rest, x)
  return num_remat, loss, y, stats, grads


def test_remat_matches_no_remat():
  x = _images(batch=2, size=32)
  num_ref, loss_ref, y_ref, stats_ref, grads_ref = _loss_and_grads(False, x)
  num_remat, loss, y, stats, grads = _loss_and_grads(True, x)
  assert (num_ref, num_remat) == (0, 8)  # One checkpoint per ResNet18 block.
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  grad_leaves = jax.tree.leaves(grads)
  assert all(float(jnp.abs(g).max()) > 0 for g in grad_leaves)
  for a, b in zip(grad_leaves, jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_build_backbone_via_registry():
  model = nnx.eval_shape(lambda: build_backbone("resnet", "50", rngs=nnx.Rngs(0)))
  assert isinstance(model, ResNet) and model.embed_dim == 2048


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match=r"'51'.*18, 34, 50, 101, 152"):
    ResNet("51", rngs=nnx.Rngs(0))


# CIFAR ResNet18 (3x3/1 stem, no max-pool), as in kuangliu/pytorch-cifar and timm's
# `resnet18` with a 3x3 stem: torchvision's 11,689,512 minus the 7x7x3x64 stem conv plus
# a 3x3x3x64 one, minus the 1000-class fc (512·1000 + 1000).
_CIFAR18_BACKBONE_PARAMS = 11_689_512 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - 513_000


def test_cifar_stem_keeps_resolution_and_param_count():
  model = nnx.eval_shape(lambda: ResNet("18", stem="cifar", rngs=nnx.Rngs(0)))
  assert sum(x.size for x in _leaves(model, nnx.Param)) == _CIFAR18_BACKBONE_PARAMS
  model = ResNet("18", stem="cifar", width=8, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 32, 32, 3))
  h = nnx.relu(model.stem_bn(model.stem_conv(x), use_running_average=True))
  assert h.shape == (2, 32, 32, 8)  # no stride, no max-pool
  for stage in model.stages:
    h = stage(h, train=False)
  assert h.shape == (2, 4, 4, 64)   # a 4x4 last map at 32 px (ImageNet stem: 1x1)
  assert model.embed_dim == 64 and model(x, train=False).shape == (2, 64)


def test_preact_is_the_last_block_before_its_relu():
  # With a 1x1 last map (ImageNet stem at 32 px) pooling is the identity, so the
  # paper's z must equal relu(preact z) exactly, from the same weights.
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  relu = ResNet("18", width=8, rngs=nnx.Rngs(3), zero_init_last_bn=False)
  pre = ResNet("18", width=8, representation="preact", rngs=nnx.Rngs(3),
               zero_init_last_bn=False)
  z_relu, z_pre = relu(x, train=False), pre(x, train=False)
  np.testing.assert_allclose(np.asarray(z_relu), np.maximum(np.asarray(z_pre), 0), atol=1e-6)
  assert (np.asarray(z_pre) < 0).mean() > 0.2   # signed ...
  assert (np.asarray(z_relu) == 0).mean() > 0.2  # ... where the ReLU output is sparse


def test_bad_resnet_options_name_the_fix():
  for kwargs, text in ((dict(stem="tiny"), "model.options.stem"),
                       (dict(representation="post"), "model.options.representation"),
                       (dict(width=0), "model.options.width")):
    with pytest.raises(ConfigError, match=text.replace(".", r"\.")):
      ResNet("18", rngs=nnx.Rngs(0), **kwargs)
