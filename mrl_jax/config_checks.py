"""Checks a config before anything is built or compiled, naming each problem and its fix."""

import math
from typing import Any, List

from mrl_jax import experiment, mrl, optim
from mrl_jax.errors import ConfigError


def check_config(config: Any, data_parallel: int) -> None:
  """Raises ConfigError listing every problem found (not just the first)."""
  problems: List[str] = []
  add = problems.append
  if config.num_classes <= 0:
    add(f"num_classes={config.num_classes} must be positive (--config.num_classes).")
  if config.mrl.mode not in mrl.HEAD_MODES:
    add(f"mrl.mode={config.mrl.mode!r}: choose one of {mrl.HEAD_MODES}.")
  if config.mrl.loss not in mrl.LOSS_TYPES:
    add(f"mrl.loss={config.mrl.loss!r}: choose one of {mrl.LOSS_TYPES}.")
  if config.input.get("multi_label") and config.mrl.loss != "sigmoid":
    add("Multi-label input needs the sigmoid loss: set --config.mrl.loss=sigmoid.")
  if config.optim.name not in optim.OPTIMIZERS:
    add(f"optim.name={config.optim.name!r}: choose one of {optim.OPTIMIZERS}.")
  if (config.total_steps > 0) == (config.num_epochs > 0):
    add(f"Set exactly one of total_steps ({config.total_steps}) and num_epochs "
        f"({config.num_epochs}) to a positive value; set the other to 0.")
  if config.mrl.mode in mrl.HEAD_MODES:
    _check_head(config, add)
  batch, micro = config.input.batch_size, config.microbatches
  if micro < 1 or batch % micro:
    add(f"input.batch_size={batch} must be divisible by microbatches={micro}.")
  elif (batch // micro) % data_parallel:
    add(f"The per-microbatch batch {batch // micro} (input.batch_size={batch} / "
        f"microbatches={micro}) is not divisible by the {data_parallel} data-parallel "
        f"devices (mesh data×fsdp); use a batch size that is a multiple of "
        f"{data_parallel * micro}, e.g. {_round_up(batch, data_parallel * micro)}.")
  if config.input.eval_batch_size % data_parallel:
    add(f"input.eval_batch_size={config.input.eval_batch_size} is not divisible by the "
        f"{data_parallel} data-parallel devices; use e.g. "
        f"{_round_up(config.input.eval_batch_size, data_parallel)}.")
  if config.input.image_size <= 0:
    add(f"input.image_size={config.input.image_size} must be positive.")
  if config.checkpoint.every_minutes < 0:
    add(f"checkpoint.every_minutes={config.checkpoint.every_minutes} is negative: set "
        "--config.checkpoint.every_minutes to the most minutes of work a kill may lose "
        "(e.g. 10), or to 0 to save by step count only (checkpoint.every_steps).")
  if problems:
    raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))


def _check_head(config: Any, add) -> None:
  """The nesting list, FF-k's k and the loss weights against the embedding width d."""
  if config.model.neck_dim < 0:
    add(f"model.neck_dim={config.model.neck_dim} must be 0 (no neck) or positive.")
    return
  try:  # An unknown model name or variant is reported here too.
    width = experiment.embedding_width(config)
  except ConfigError as e:
    add(str(e))
    return
  try:
    nesting = experiment.resolve_nesting(config, width)
    dims = mrl.head_dims(config.mrl.mode, nesting, width, config.mrl.ff_dim)
  except ConfigError as e:
    add(str(e))
    return
  weights = tuple(config.mrl.weights)
  if weights and len(weights) != len(dims):
    add(f"mrl.weights has {len(weights)} entries for the {len(dims)} dims {list(dims)} of "
        f"the {config.mrl.mode} head; give one weight per dim, or () for all ones.")


def total_steps(config: Any, train_examples: int) -> int:
  """Steps from `total_steps`, or from `num_epochs` over the train split."""
  if config.total_steps > 0:
    return int(config.total_steps)
  return max(1, math.ceil(config.num_epochs * train_examples / config.input.batch_size))


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple
