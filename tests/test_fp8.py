"""FP8 matmuls (models/fp8.py) against numpy on ml_dtypes' float8 types, and a short
convergence check: the same small classifier trained with and without FP8."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from mrl_jax.models import fp8, vit


def _qdq(x, dtype):
  """The reference: scale amax to the format's max, round to float8, scale back."""
  x = np.asarray(x, np.float32)
  amax = np.abs(x).max()
  scale = amax / float(ml_dtypes.finfo(dtype).max) if amax > 0 else 1.0
  return (x / scale).astype(dtype).astype(np.float32) * scale


def test_forward_and_gradients_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3
  w = rng.normal(size=(16, 8)).astype(np.float32) * 0.1
  g = rng.normal(size=(2, 5, 8)).astype(np.float32)
  y, vjp = jax.vjp(jax.jit(fp8.fp8_matmul), x, w)
  xq, wq, gq = _qdq(x, ml_dtypes.float8_e4m3fn), _qdq(w, ml_dtypes.float8_e4m3fn), _qdq(
      g, ml_dtypes.float8_e5m2)
  np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-5)
  dx, dw = vjp(jnp.asarray(g))
  np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, xq.reshape(-1, 16).T @ gq.reshape(-1, 8), rtol=1e-5,
                             atol=1e-5)
  # FP8 rounds: e4m3 keeps 3 mantissa bits, so the product is near, not equal.
  exact = x @ w
  assert 0 < np.abs(y - exact).max() < 0.1 * np.abs(exact).max()


def test_zero_input_and_unsupported_contractions():
  np.testing.assert_array_equal(fp8.fp8_matmul(jnp.zeros((3, 4)), jnp.ones((4, 2))), 0)
  with pytest.raises(ValueError, match=r"\[k, n\] only"):
    fp8.fp8_dot_general(jnp.ones((3, 4)), jnp.ones((2, 4)), (((1,), (1,)), ((), ())))


def test_vit_fp8_option_keeps_parameters_and_nearly_the_output():
  build = lambda **kw: vit.ViT("mu/4", rngs=nnx.Rngs(params=0, dropout=1), image_size=32,
                               pool="gap", **kw)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  forward = lambda m: jax.jit(lambda s: nnx.merge(nnx.graphdef(m), s)(x, train=False))(
      nnx.state(m))
  plain, fast = build(), build(matmul="fp8")
  jax.tree.map(np.testing.assert_array_equal, nnx.state(plain, nnx.Param),
               nnx.state(fast, nnx.Param))
  a, b = forward(plain), forward(fast)
  assert 0 < np.abs(a - b).max() < 0.1 * np.abs(a).max()
  with pytest.raises(ValueError, match="matmul 'fp16'"):
    nnx.eval_shape(lambda: build(matmul="fp16"))


class _Mlp(nnx.Module):
  def __init__(self, dot_general, rngs):
    self.fc1 = nnx.Linear(64, 128, dot_general=dot_general, rngs=rngs)
    self.fc2 = nnx.Linear(128, 10, dot_general=dot_general, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


def _train_and_score(dot_general, steps=1000):
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32)
  train_x, train_y, test_x, test_y = images[:1400], labels[:1400], images[1400:], labels[1400:]
  model = _Mlp(dot_general, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(x), y).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(train_x), 64)
    params, opt_state = step(params, opt_state, train_x[idx], train_y[idx])
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, test_x)
  return float((np.asarray(logits).argmax(-1) == test_y).mean())


def test_fp8_training_converges_like_the_wide_matmul():
  plain = _train_and_score(jax.lax.dot_general)
  low = _train_and_score(fp8.fp8_dot_general)
  assert plain > 0.88, plain  # 0.917 on held-out digits, as is the FP8 one
  assert low > plain - 0.03, (low, plain)
