"""Schedules, weight-decay masks and optimizer updates against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from mrl_jax import optim


def _optim(**kw):
  c = common.get_base_config().optim  # SGD, momentum 0.9, cosine, no warm-up or decay
  c.update(dict(name="sgd", lr=0.4, no_decay=r"pos_embed|cls_token"))
  c.update(kw)
  return c


def test_warmup_then_cosine_linear_constant():
  for name, mid in [("cosine", 0.2), ("linear", 0.2), ("constant", 0.4)]:
    s = optim.make_schedule(_optim(schedule=name, warmup_steps=10), total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(s(5), 0.2, rtol=1e-6)        # half-way up the warm-up
    np.testing.assert_allclose(s(10), 0.4, rtol=1e-6)       # peak
    np.testing.assert_allclose(s(60), mid, rtol=1e-5)       # half-way through decay
  np.testing.assert_allclose(optim.make_schedule(_optim(schedule="linear"), 100)(100), 0.0)
  end = optim.make_schedule(_optim(end_lr_fraction=0.1), 100)(100)
  np.testing.assert_allclose(end, 0.04, rtol=1e-5)


def test_schedule_errors():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(_optim(warmup_steps=100), 100)
  with pytest.raises(ValueError, match="Unknown schedule"):
    optim.make_schedule(_optim(schedule="step"), 100)
  with pytest.raises(ValueError, match="Unknown optimizer"):
    optim.make_optimizer(_optim(name="lamb"), 100, {})


class _Tiny(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.dense = nnx.Linear(3, 2, rngs=rngs)
    self.norm = nnx.LayerNorm(2, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.ones((1, 4, 2)))


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
  params = nnx.state(_Tiny(), nnx.Param)
  mask = nnx.to_pure_dict(optim.decay_mask(params, r"pos_embed"))
  assert mask == {"dense": {"kernel": True, "bias": False},
                  "norm": {"scale": False, "bias": False}, "pos_embed": False}


def test_sgd_step_with_coupled_weight_decay_matches_hand_computation():
  params = nnx.state(_Tiny(), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  cfg = _optim(schedule="constant", lr=0.1, weight_decay=0.01, momentum=0.9)
  tx, _ = optim.make_optimizer(cfg, 10, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  w = np.asarray(params["dense"]["kernel"][...])
  np.testing.assert_allclose(new["dense"]["kernel"][...], w - 0.1 * (0.5 + 0.01 * w), rtol=1e-6)
  b = np.asarray(params["dense"]["bias"][...])
  np.testing.assert_allclose(new["dense"]["bias"][...], b - 0.1 * 0.5, rtol=1e-6)


def test_global_norm_clipping_and_other_optimizers_run():
  params = nnx.state(_Tiny(), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  tx, _ = optim.make_optimizer(_optim(schedule="constant", lr=1.0, momentum=0.0,
                                      clip_norm=1.0), 10, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)
  for name in ("adamw", "adafactor"):
    tx, _ = optim.make_optimizer(_optim(name=name, lr=1e-3, weight_decay=1e-4), 10, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))
