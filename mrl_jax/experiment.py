"""From a config to the compiled pieces of a run: model, optimizer, sharded state, steps.

The training loop, the throughput benchmark and the tests all start here, so
they train exactly the same thing.
"""

import dataclasses
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mrl_jax import data, models, mrl, optim, sharding, steps


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


def build_classifier(config: Any, *, rngs: nnx.Rngs) -> mrl.MRLClassifier:
  """Backbone (from the model registry), optional neck and head, as `config.model` and
  `config.mrl` say. Every backbone takes `image_size` (`config.input.image_size`), so
  one override changes the data and the model consistently."""
  model_cfg = config.model
  dtype, param_dtype = jnp.dtype(model_cfg.dtype), jnp.dtype(model_cfg.param_dtype)
  backbone = _build_backbone(config, rngs)
  embed_dim, neck = backbone.embed_dim, None
  if model_cfg.neck_dim:
    embed_dim = int(model_cfg.neck_dim)
    neck = nnx.Linear(backbone.embed_dim, embed_dim, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
  nesting = resolve_nesting(config, embed_dim)
  head = mrl.MatryoshkaHead(config.mrl.mode, nesting, embed_dim, config.num_classes,
                            ff_dim=config.mrl.ff_dim, bias_init=config.mrl.head_bias_init,
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype)
  return mrl.MRLClassifier(backbone, head, neck)


def _build_backbone(config: Any, rngs: nnx.Rngs) -> nnx.Module:
  model_cfg = config.model
  return models.build_backbone(
      model_cfg.name, model_cfg.variant, rngs=rngs, dtype=jnp.dtype(model_cfg.dtype),
      param_dtype=jnp.dtype(model_cfg.param_dtype), remat=model_cfg.remat,
      image_size=config.input.image_size, **dict(model_cfg.options))


def embedding_width(config: Any) -> int:
  """d, the width of z: the neck's, or the backbone's. The backbone is built abstractly
  (no memory, no compile), which checks its options too, so that the model and head
  settings fail before anything is built."""
  backbone = nnx.eval_shape(lambda: _build_backbone(config, nnx.Rngs(0)))
  return int(config.model.neck_dim) if config.model.neck_dim else int(backbone.embed_dim)


def resolve_nesting(config: Any, embed_dim: int) -> Tuple[int, ...]:
  """The configured nesting list, or the paper's default for this width."""
  nesting = config.mrl.nesting
  return mrl.validate_nesting(nesting if nesting else mrl.default_nesting(embed_dim), embed_dim)


def model_factory(config: Any) -> Callable[[], nnx.Module]:
  """The classifier of `config`, seeded as every run builds it (training, evaluation)."""

  def build_model():
    return build_classifier(config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
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
