"""Tests for the ViT backbone: timm-exact sizes, pools, dropout rng plumbing, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax.models import build_backbone
from mrl_jax.models.vit import ViT

_X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def _tiny(**kwargs) -> ViT:
  return ViT("mu/4", rngs=nnx.Rngs(params=0, dropout=1), image_size=32, **kwargs)


def _forward(model: nnx.Module, x: jax.Array, **kwargs) -> jax.Array:
  # Jitted: op-by-op eager dispatch is the slow part of these tests on CPU.
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, x)


def _num_params(module: nnx.Module) -> int:
  return sum(int(np.prod(p.shape))
             for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("variant, expected", [
    ("Ti/16", 5_717_416),
    ("S/16", 22_050_664),
    ("B/16", 86_567_656),
    ("L/16", 304_326_632),
])
def test_param_count_matches_timm(variant, expected):
  # eval_shape: shapes only, nothing is allocated.
  model = nnx.eval_shape(lambda: ViT(variant, rngs=nnx.Rngs(0)))
  head = model.embed_dim * 1000 + 1000  # timm's classifier, not in the backbone.
  assert _num_params(model) + head == expected


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_forward_shapes(pool):
  model = _tiny(pool=pool)
  y = _forward(model, _X, train=False)
  assert y.shape == (2, model.embed_dim) == (2, 32)
  assert y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


def test_param_names_are_readable():
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(
      nnx.state(_tiny(pool="cls"), nnx.Param))}
  for name in ["patch_embed/kernel", "pos_embed", "cls_token", "norm/scale",
               "blocks/0/attn/query/kernel", "blocks/1/attn/out/bias",
               "blocks/0/mlp/fc1/kernel", "blocks/0/norm1/scale"]:
    assert name in paths
  assert "cls_token" not in {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(
      nnx.state(_tiny(pool="gap"), nnx.Param))}


def test_eval_is_deterministic_and_train_is_stochastic():
  model = _tiny(dropout=0.1, attention_dropout=0.1, stochastic_depth=0.2)
  graphdef, state = nnx.split(model)

  @jax.jit
  def train_step(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, train=True), nnx.state(m)

  eval_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))
  y_eval = eval_fn(state, _X)
  y1, new_state = train_step(state, _X)
  y2, new_state = train_step(new_state, _X)
  assert not np.allclose(y1, y2)  # Fresh masks: the rng state was carried.
  assert not np.allclose(y1, y_eval)
  # Eval ignores the (advanced) rng state.
  np.testing.assert_array_equal(eval_fn(new_state, _X), y_eval)


def test_init_does_not_depend_on_regularisation():
  # Rng streams are forked whatever the rates, so a single-seed Rngs gives the
  # same weights with and without dropout.
  a = ViT("mu/4", rngs=nnx.Rngs(0), image_size=32)
  b = ViT("mu/4", rngs=nnx.Rngs(0), image_size=32, dropout=0.1)
  jax.tree.map(np.testing.assert_array_equal,
               nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))


def test_bf16_compute_keeps_f32_params_and_output():
  model = _tiny(pool="map", dtype=jnp.bfloat16)
  dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  y = _forward(model, _X, train=False)
  assert y.dtype == jnp.float32
  y32 = _forward(_tiny(pool="map"), _X, train=False)  # Same seed, so same weights.
  np.testing.assert_allclose(y, y32, atol=0.1, rtol=0.05)
  assert not np.array_equal(y, y32)  # bf16 really was used.


def test_remat_matches_plain():
  kwargs = dict(dropout=0.1, stochastic_depth=0.2)

  def value_and_grad(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # copy=True: merge must make fresh rng Variables at the grad trace level,
    # since dropout advances their counters (reused ones raise
    # TraceContextError).
    def loss(params, rest):
      m = nnx.merge(graphdef, params, rest, copy=True)
      return jnp.sum(jnp.sin(m(_X, train=True))), nnx.state(m, nnx.RngCount)

    (value, rng_state), grads = jax.jit(
        jax.value_and_grad(loss, has_aux=True))(params, rest)
    return value, grads, rng_state

  v0, g0, c0 = value_and_grad(_tiny(**kwargs))
  v1, g1, c1 = value_and_grad(_tiny(remat=True, **kwargs))
  # Same number of masks drawn per layer, and dropout really was drawn.
  jax.tree.map(np.testing.assert_array_equal, c0, c1)
  assert sum(int(c) for c in jax.tree.leaves(c0)) > 0
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               g0, g1)


def test_build_backbone_via_registry():
  model = build_backbone("vit", "mu/4", rngs=nnx.Rngs(0), image_size=32)
  assert isinstance(model, ViT)
  assert _forward(model, _X, train=False).shape == (2, 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="B16"), r"'<size>/<patch>'"),
    (dict(variant="X/16"), r"Bad ViT variant 'X/16'"),
    (dict(variant="B/0"), r"positive integer patch"),
    (dict(variant="B/16", image_size=100), r"not divisible by the patch size 16"),
    (dict(variant="B/16", pool="avg"), r"Unknown ViT pool 'avg'.*'gap'"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: ViT(rngs=nnx.Rngs(0), **kwargs))


def test_wrong_input_size_raises():
  with pytest.raises(ValueError, match="image_size"):
    _tiny()(jnp.zeros((1, 64, 64, 3)), train=False)


def _np_attention(attn, x):
  """Multi-head softmax attention written out in numpy from the module's weights."""
  p = lambda layer: (np.asarray(layer.kernel[...]), np.asarray(layer.bias[...]))
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = map(p, (attn.query, attn.key, attn.value,
                                                   attn.out))
  heads = attn.heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1)
  q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
  return y @ wo + bo


def test_attention_matches_numpy():
  from mrl_jax.models.vit import Attention  # pylint: disable=import-outside-toplevel
  attn = Attention(32, 4, attention_dropout=0.0, dropout=0.0, dtype=jnp.float32,
                   param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 7, 32)))
  want = _np_attention(attn, x.astype(np.float64))
  np.testing.assert_allclose(attn(jnp.asarray(x), train=False), want, rtol=1e-4, atol=1e-5)
