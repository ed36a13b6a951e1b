"""Impossible configs fail before compiling, with messages that name the fix."""

import pytest

from configs import demo, resnet50_i1k, vit_b16_i1k, vit_jft
from mrl_jax import config_checks


def _demo(**overrides):
  c = demo.get_config()
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


@pytest.mark.parametrize("overrides,fragment", [
    ({"input.batch_size": 60}, "multiple of 8"),
    ({"microbatches": 7}, "divisible by microbatches"),
    ({"input.eval_batch_size": 100}, "eval_batch_size=100"),
    ({"total_steps": 10}, "exactly one of total_steps"),
    ({"mrl.mode": "matryoshka"}, "mrl.mode"),
    ({"mrl.loss": "hinge"}, "mrl.loss"),
    ({"mrl.weights": (1.0, 2.0)}, "one weight per dim"),
    ({"input.multi_label": True}, "--config.mrl.loss=sigmoid"),
    ({"optim.name": "lion"}, "optim.name"),
    # The head against the embedding width (the demo's neck: 512), before any build.
    ({"mrl.nesting": (8, 4)}, "strictly increasing"),
    ({"mrl.nesting": (8, 1024)}, "exceeds the embedding width 512"),
    ({"mrl.mode": "ff", "mrl.ff_dim": 0}, "ff_dim in \\[1, 512\\]"),
    ({"model.neck_dim": 0, "mrl.nesting": (8, 1024)}, "exceeds the embedding width 512"),
    ({"model.variant": "7"}, "variant"),
])
def test_bad_configs_are_named(overrides, fragment):
  with pytest.raises(config_checks.ConfigError, match=fragment):
    config_checks.check_config(_demo(**overrides), data_parallel=8)


def test_all_problems_are_reported_at_once():
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.check_config(_demo(**{"mrl.loss": "x", "optim.name": "y"}), 1)
  assert "mrl.loss" in str(info.value) and "optim.name" in str(info.value)


@pytest.mark.parametrize("module", [demo, resnet50_i1k, vit_b16_i1k, vit_jft])
@pytest.mark.parametrize("variant", [None, "runlocal", "synthetic", "runlocal,synthetic"])
def test_shipped_configs_are_valid(module, variant):
  config_checks.check_config(module.get_config(variant), data_parallel=8)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="runlocal"):
    demo.get_config("runlokal")


def test_epochs_become_steps():
  c = demo.get_config()
  assert config_checks.total_steps(c, 1437) == -(-int(c.num_epochs * 1437) // 64)
