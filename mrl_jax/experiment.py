"""From a config to the compiled pieces of a run: model, optimizer, sharded state, steps.

The training loop, the throughput benchmark and the tests all start here, so
they train exactly the same thing.
"""

import dataclasses
from typing import Any, Callable, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mrl_jax import data, mrl, optim, sharding, steps


@dataclasses.dataclass
class Experiment:
  graphdef: nnx.GraphDef      # the model's structure; nnx.merge(graphdef, params, ...)
  state: steps.TrainState
  train_step: Callable
  eval_step: Callable
  state_shardings: Any
  batch_sharding: NamedSharding
  dims: Tuple[int, ...]       # the nesting dims the head produces logits for
  num_params: int
  sharding_summary: str


def loss_kwargs(config: Any) -> dict:
  return dict(loss_type=config.mrl.loss, label_smoothing=config.mrl.label_smoothing,
              weights=tuple(config.mrl.weights) or None)


def model_factory(config: Any) -> Callable[[], nnx.Module]:
  """The classifier of `config`, seeded as every run builds it (training, evaluation)."""

  def build_model():
    return mrl.build_classifier(
        config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
  return build_model


def build_experiment(config: Any, mesh: Mesh, total_steps: int) -> Experiment:
  """Builds the model abstractly (validating it), then the sharded state and steps."""
  build_model = model_factory(config)
  abstract_model = nnx.eval_shape(build_model)  # Validates nesting etc. without allocating.
  abstract_params = steps.split_model(abstract_model)[1]
  tx, schedule = optim.make_optimizer(config.optim, total_steps, abstract_params)
  graphdef, abstract_state = steps.abstract_train_state(build_model, tx)
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
  batch_sharding = sharding.batch_sharding(mesh)
  kwargs = loss_kwargs(config)
  # The specs' normalize(...) runs inside the steps: batches travel as uint8.
  norm = data.normalization(config.input, num_classes=config.num_classes)
  return Experiment(
      graphdef=graphdef,
      state=steps.init_train_state(build_model, tx, state_shardings),
      train_step=steps.make_train_step(graphdef, tx, schedule, state_shardings, batch_sharding,
                                       loss_kwargs=kwargs, microbatches=config.microbatches,
                                       normalization=norm,
                                       poison_steps=tuple(config.debug_poison_steps)),
      eval_step=steps.make_eval_step(graphdef, state_shardings, batch_sharding,
                                     loss_kwargs=kwargs, normalization=norm),
      state_shardings=state_shardings, batch_sharding=batch_sharding,
      dims=abstract_model.head.dims,
      num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)),
      sharding_summary=sharding.describe(state_shardings, abstract_state))
