"""Matryoshka heads and the nested loss against an independent numpy computation of MRL.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax import mrl


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_nested_loss(logits, labels, weights, smoothing, loss_type):
  """Σ_m c_m · mean_b loss(logits_m[b], y_b), written from the formulas in MRL.md."""
  num_classes = logits.shape[-1]
  if labels.ndim == 1:
    targets = np.eye(num_classes)[labels]
  else:
    targets = labels.astype(np.float64)
  targets = (1 - smoothing) * targets + smoothing / num_classes
  total, per_dim = 0.0, []
  for m in range(logits.shape[0]):
    z = logits[m].astype(np.float64)
    if loss_type == "softmax":
      loss = -(targets * np_log_softmax(z)).sum(-1).mean()
    else:
      p = 1 / (1 + np.exp(-z))
      loss = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(-1).mean()
    per_dim.append(loss)
    total += weights[m] * loss
  return total, np.array(per_dim)


@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_nested_loss_matches_numpy(loss_type, smoothing, weighted):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, size=6)
  weights = [0.5, 1.0, 2.0, 0.25] if weighted else [1.0] * 4
  total, metrics = mrl.nested_loss(jnp.asarray(logits), jnp.asarray(labels),
                                   loss_type=loss_type, label_smoothing=smoothing,
                                   weights=weights if weighted else None)
  ref_total, ref_per_dim = np_nested_loss(logits, labels, weights, smoothing, loss_type)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_per_dim"], ref_per_dim, rtol=1e-5)
  ref_top1 = (logits.argmax(-1) == labels[None]).mean(-1)
  np.testing.assert_allclose(metrics["top1_per_dim"], ref_top1)


def test_sigmoid_loss_with_multi_hot_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 5, 9)).astype(np.float32)
  labels = (rng.random((5, 9)) < 0.3).astype(np.int32)
  labels[np.arange(5), logits[0].argmax(-1)] = 1  # dim 0 gets every top-1 right
  total, metrics = mrl.nested_loss(jnp.asarray(logits), jnp.asarray(labels),
                                   loss_type="sigmoid")
  ref_total, ref_per_dim = np_nested_loss(logits, labels, [1.0] * 3, 0.0, "sigmoid")
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_per_dim"], ref_per_dim, rtol=1e-5)
  pred = logits.argmax(-1)
  ref_top1 = np.array([[labels[b, pred[m, b]] for b in range(5)] for m in range(3)]).mean(-1)
  np.testing.assert_allclose(metrics["top1_per_dim"], ref_top1)
  assert metrics["top1_per_dim"][0] == 1.0


def test_softmax_loss_with_mixup_soft_targets():
  """Soft targets from mixup/cutmix: CE = -Σ t·log p; top-1 is the dominant class."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  a, b, lam = rng.integers(0, 5, 6), rng.integers(0, 5, 6), 0.7
  targets = lam * np.eye(5)[a] + (1 - lam) * np.eye(5)[b]
  total, metrics = mrl.nested_loss(jnp.asarray(logits), jnp.asarray(targets, jnp.float32))
  ref = -(targets[None] * np_log_softmax(logits)).sum(-1).mean(-1)
  np.testing.assert_allclose(metrics["loss_per_dim"], ref, rtol=1e-5)
  np.testing.assert_allclose(total, ref.sum(), rtol=1e-5)
  ref_top1 = (logits.argmax(-1) == targets.argmax(-1)[None]).mean(-1)
  np.testing.assert_allclose(metrics["top1_per_dim"], ref_top1)


def test_loss_weight_count_must_match():
  with pytest.raises(ValueError, match="one weight per dim"):
    mrl.nested_loss(jnp.zeros((3, 2, 4)), jnp.zeros((2,), jnp.int32), weights=[1.0, 1.0])


def _random_params(head, seed=0):
  """Gives a zero-initialised head random weights, so the comparisons mean something."""
  graphdef, state = nnx.split(head)
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), state)
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("nesting,d", [((2, 4, 8), 8), ((1, 3, 10, 16), 20), ((5,), 5),
                                        ((8, 16, 32, 64, 128), 128)])
def test_mrl_e_fused_equals_naive_slices(nesting, d):
  head = _random_params(mrl.MatryoshkaHead("mrl_e", nesting, d, 11, rngs=nnx.Rngs(0)))
  z = np.random.default_rng(2).normal(size=(5, d)).astype(np.float32)
  out = np.asarray(head(jnp.asarray(z)))
  w, b = np.asarray(head.linear.kernel[...]), np.asarray(head.linear.bias[...])
  naive = np.stack([z[:, :m] @ w[:m] + b for m in nesting])  # z[:m] W[:, :m]^T + b
  assert out.shape == (len(nesting), 5, 11)
  np.testing.assert_allclose(out, naive, rtol=1e-4, atol=1e-4)


def test_mrl_separate_heads_match_numpy():
  nesting = (2, 4, 8)
  head = _random_params(mrl.MatryoshkaHead("mrl", nesting, 8, 6, rngs=nnx.Rngs(0)))
  z = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
  out = np.asarray(head(jnp.asarray(z)))
  for i, m in enumerate(nesting):
    w, b = np.asarray(head.heads[i].kernel[...]), np.asarray(head.heads[i].bias[...])
    assert w.shape == (m, 6)
    np.testing.assert_allclose(out[i], z[:, :m] @ w + b, rtol=1e-4, atol=1e-4)


def test_ff_and_none_heads_read_the_right_dims():
  z = np.random.default_rng(4).normal(size=(3, 16)).astype(np.float32)
  ff = _random_params(mrl.MatryoshkaHead("ff", (4, 8), 16, 5, ff_dim=4, rngs=nnx.Rngs(0)))
  w, b = np.asarray(ff.linear.kernel[...]), np.asarray(ff.linear.bias[...])
  assert w.shape == (4, 5) and ff.dims == (4,)
  np.testing.assert_allclose(np.asarray(ff(jnp.asarray(z)))[0], z[:, :4] @ w + b, rtol=1e-4,
                             atol=1e-4)
  plain = mrl.MatryoshkaHead("none", (4, 8), 16, 5, rngs=nnx.Rngs(0))
  assert plain.dims == (16,) and plain(jnp.asarray(z)).shape == (1, 3, 5)


def test_head_parameter_counts():
  count = lambda h: sum(x.size for x in jax.tree.leaves(nnx.state(h, nnx.Param)))
  nesting, d, classes = (8, 16, 32), 32, 10
  assert count(mrl.MatryoshkaHead("mrl", nesting, d, classes, rngs=nnx.Rngs(0))) == \
      sum(m * classes + classes for m in nesting)
  assert count(mrl.MatryoshkaHead("mrl_e", nesting, d, classes, rngs=nnx.Rngs(0))) == \
      d * classes + classes


def test_default_nesting_lists_are_the_papers():
  assert mrl.default_nesting(2048) == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  assert mrl.default_nesting(768) == (12, 24, 48, 96, 192, 384, 768)


@pytest.mark.parametrize("nesting,message", [
    ((), "empty"), ((0, 8), "positive"), ((8, 8, 16), "strictly increasing"),
    ((16, 8), "strictly increasing"), ((8, 64), "exceeds the embedding width 32")])
def test_nesting_validation_messages(nesting, message):
  with pytest.raises(ValueError, match=message) as info:
    mrl.validate_nesting(nesting, 32)
  assert "--config.mrl.nesting" in str(info.value)


def test_bad_head_mode_and_ff_dim():
  with pytest.raises(ValueError, match="Unknown head mode"):
    mrl.head_dims("slimmable", (8,), 8)
  with pytest.raises(ValueError, match="ff_dim"):
    mrl.head_dims("ff", (8,), 8, ff_dim=0)


def test_neck_makes_z_a_linear_projection_of_the_backbone_features():
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  from mrl_jax import experiment  # pylint: disable=import-outside-toplevel
  config = fashion_mnist.get_config()
  config.model.options.representation = "relu"
  config.model.neck_dim = 32
  config.mrl.nesting = (2, 8, 32)
  model = experiment.build_classifier(config, rngs=nnx.Rngs(0))
  assert model.head.dims == (2, 8, 32) and model.neck.kernel.shape == (64, 32)
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 3))
  z, logits = model(x, train=False)
  features = np.asarray(model.backbone(x, train=False), np.float64)
  assert (features >= 0).all()  # pooled ReLU outputs ...
  want = features @ np.asarray(model.neck.kernel[...]) + np.asarray(model.neck.bias[...])
  np.testing.assert_allclose(np.asarray(z), want, rtol=1e-5, atol=1e-5)
  assert (np.asarray(z) < 0).any() and logits.shape == (3, 3, 10)  # ... projected, signed
