"""The ViT speed options (model.options) against the plain path they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax.models import vit

_X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def _forward(model, x, **kwargs):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, x)


def _tiny(**kwargs):
  return vit.ViT("mu/4", rngs=nnx.Rngs(params=0, dropout=1), image_size=32, **kwargs)


@pytest.fixture(scope="module")
def plain_output():
  return _forward(_tiny(pool="gap"), _X, train=False)


@pytest.mark.parametrize("options", [dict(patch_embed="matmul"), dict(attention="xla"),
                                     dict(attention="auto")])
def test_option_has_the_plain_parameters_and_output(options, plain_output):
  fast = _tiny(pool="gap", **options)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(_tiny(pool="gap"), nnx.Param),
               nnx.state(fast, nnx.Param))
  diff = np.abs(_forward(fast, _X, train=False) - plain_output).max()
  assert diff < 1e-5, diff  # 2.4e-7 (matmul), 0 (xla) on a CPU in float32


def test_padded_attention_masks_the_padding_keys():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 13, 4, 8)) for i in range(3))
  want = jax.jit(lambda q, k, v: vit.fused_attention(q, k, v, "xla"))(q, k, v)
  got = jax.jit(lambda q, k, v: vit.fused_attention(q, k, v, "xla", pad_multiple=8))(q, k, v)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-6)
  # The gradients too: nothing leaks from the padded rows back into the real ones.
  loss = lambda pad: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
      vit.fused_attention(q, k, v, "xla", pad))), argnums=(0, 1, 2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               jax.jit(loss(8))(q, k, v), jax.jit(loss(0))(q, k, v))


def test_per_step_drop_path_scales_keep_rate_and_expectation():
  rates = (0.0, 0.1, 0.5)
  scales = np.asarray(vit.drop_path_scales(jax.random.key(0), rates, 20_000))
  assert scales.shape == (3, 2, 20_000)
  np.testing.assert_array_equal(scales[0], 1.0)  # rate 0: the identity
  for rate, s in zip(rates, scales):
    keep = 1 - rate
    assert set(np.unique(s)) <= {0.0, np.float32(1 / keep)}
    assert abs((s > 0).mean() - keep) < 0.015 and abs(s.mean() - 1) < 0.03
  # Two branches and every sample draw independently.
  assert (scales[2, 0] != scales[2, 1]).any()


def test_per_step_drop_path_model():
  plain = _tiny(stochastic_depth=0.5)
  fast = _tiny(stochastic_depth=0.5, drop_path_draw="per_step")
  # Same parameters, and eval (no drop path) is the plain model's.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(plain, nnx.Param),
               nnx.state(fast, nnx.Param))
  np.testing.assert_array_equal(_forward(fast, _X, train=False),
                                _forward(plain, _X, train=False))
  graphdef, state = nnx.split(fast)

  @jax.jit
  def train(state):
    m = nnx.merge(graphdef, state)
    return m(_X, train=True), nnx.state(m)

  y1, state = train(state)
  y2, _ = train(state)
  assert not np.allclose(y1, y2)  # a fresh draw each step
  # Rate 0: the option is the plain model, rng state and all (no draw to make).
  zero = _tiny(drop_path_draw="per_step")
  assert zero.drop_path_rates is None
  assert jax.tree.structure(nnx.state(zero)) == jax.tree.structure(nnx.state(_tiny()))


def test_block_scales_multiply_each_branch_per_sample():
  block = vit.Block(32, 2, 64, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                    dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(block)
  apply = jax.jit(lambda s, x, scales: nnx.merge(graphdef, s)(x, scales, train=True))
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  plain = apply(state, x, None)
  np.testing.assert_array_equal(apply(state, x, jnp.ones((2, 2))), plain)
  # Sample 0 drops both branches (the identity); sample 1 keeps both.
  y = apply(state, x, jnp.asarray([[0.0, 1.0], [0.0, 1.0]]))
  np.testing.assert_array_equal(y[0], x[0])
  np.testing.assert_array_equal(y[1], plain[1])


def test_tanh_gelu_mlp_matches_numpy():
  mlp = vit.Mlp(8, 16, dropout=0.0, dtype=jnp.float32, param_dtype=jnp.float32,
                rngs=nnx.Rngs(0), gelu="tanh")
  x = np.asarray(jax.random.normal(jax.random.key(2), (4, 8))) * 3
  h = x @ np.asarray(mlp.fc1.kernel[...]) + np.asarray(mlp.fc1.bias[...])
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  want = h @ np.asarray(mlp.fc2.kernel[...]) + np.asarray(mlp.fc2.bias[...])
  np.testing.assert_allclose(mlp(jnp.asarray(x), train=False), want, rtol=1e-5, atol=1e-5)


def test_tanh_gelu_model_keeps_the_parameters_and_nearly_the_output(plain_output):
  fast = _tiny(pool="gap", gelu="tanh")
  jax.tree.map(np.testing.assert_array_equal, nnx.state(_tiny(pool="gap"), nnx.Param),
               nnx.state(fast, nnx.Param))
  diff = np.abs(_forward(fast, _X, train=False) - plain_output).max()
  assert 0 < diff < 1e-2, diff  # The approximation is within 4.7e-4 of erf's GELU.


@pytest.mark.parametrize("kwargs, match", [
    (dict(patch_embed="fft"), "patch_embed 'fft'"),
    (dict(attention="flash"), "attention 'flash'"),
    (dict(drop_path_draw="once"), "drop_path_draw 'once'"),
    (dict(gelu="relu"), "gelu 'relu'"),
    (dict(attention="xla", attention_dropout=0.1), "no attention dropout"),
])
def test_bad_option_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: _tiny(**kwargs))
