"""Optimizer and learning-rate schedule from `config.optim`.

Recipes this covers: the paper's ResNet50 (SGD + momentum, coupled L2 weight
decay off norms and biases, warm-up then linear to 0), ViT on JFT (Adafactor,
linear decay) and AdamW. Gradient accumulation lives in the train step (a
scan over micro-batches), so one optimizer update is one step everywhere.
Every field is read from `config.optim` as is: its defaults live in
configs/common.py (get_base_config), nowhere else.
"""

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mrl_jax.errors import ConfigError
from mrl_jax.sharding import path_string

OPTIMIZERS = ("sgd", "adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim_config: Any, total_steps: int) -> Callable[[int], float]:
  """Linear warm-up from 0 to `lr`, then cosine / linear decay or constant."""
  lr = float(optim_config.lr)
  warmup = int(optim_config.warmup_steps)
  name = optim_config.schedule
  end = lr * float(optim_config.end_lr_fraction)
  if name not in SCHEDULES:
    raise ConfigError(f"Unknown schedule {name!r}; choose one of {SCHEDULES}.")
  if warmup >= total_steps and total_steps > 0:
    raise ConfigError(f"optim.warmup_steps={warmup} is not below total_steps={total_steps}; "
                     "lower --config.optim.warmup_steps.")
  decay_steps = max(total_steps - warmup, 1)
  if name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif name == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: Any, no_decay_regex: str) -> Any:
  """True for leaves that get weight decay: matrices and kernels, not norms,
  biases or the leaves matching `no_decay_regex` (position embeddings, tokens)."""
  pattern = re.compile(no_decay_regex) if no_decay_regex else None
  def one(path, leaf):
    name = path_string(path)
    return leaf.ndim > 1 and not (pattern and pattern.search(name))
  return jax.tree_util.tree_map_with_path(one, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm`, same arithmetic, that takes the norm from the train
  step (extra argument `grad_norm`) when it is given: the step computes that norm for
  its finite guard and its metric anyway, so the gradients are reduced once, not twice."""

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(optim_config: Any, total_steps: int, params: Any
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Returns (optax transformation, schedule) for `optim_config`."""
  name = optim_config.name
  if name not in OPTIMIZERS:
    raise ConfigError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
  schedule = make_schedule(optim_config, total_steps)
  wd = float(optim_config.weight_decay)
  mask = decay_mask(params, optim_config.no_decay)
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=optim_config.momentum, nesterov=optim_config.nesterov))
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, weight_decay=wd,
                     mask=mask)
  else:
    # optim.momentum (0.9 in the base config) is Adafactor's first-moment decay too.
    tx = optax.adafactor(schedule, momentum=optim_config.momentum,
                         weight_decay_rate=wd or None, weight_decay_mask=mask if wd else None)
  clip = optim_config.clip_norm
  if clip:
    tx = optax.chain(clip_by_global_norm(float(clip)), tx)
  return tx, schedule
