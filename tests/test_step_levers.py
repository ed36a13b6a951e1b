"""The train step hands its gradient norm to the clip: outputs identical to optax's clip."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from configs import common
from mrl_jax import optim, sharding, steps


class _Toy(nnx.Module):
  """Two nesting dims of logits from a linear map: the step's maths, compiled in a blink."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc = nnx.Linear(12, 2 * 5, rngs=rngs)

  def __call__(self, images, *, train):
    del train
    logits = self.fc(images.reshape(images.shape[0], -1))
    return None, logits.reshape(-1, 2, 5).swapaxes(0, 1)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_step_with_the_shared_norm_equals_optax_clip(name):
  config = common.get_base_config().optim
  config.name, config.weight_decay, config.lr = name, 1e-4, 0.1
  config.clip_norm = 24.0  # the norms are 22.9 … 24.6: some steps clip, some do not
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
  build_model = lambda: _Toy(nnx.Rngs(0))
  params = steps.split_model(nnx.eval_shape(build_model))[1]
  tx, schedule = optim.make_optimizer(config, 10, params)
  config.clip_norm = 0.0
  plain = optax.chain(optax.clip_by_global_norm(24.0),  # computes the norm again
                      optim.make_optimizer(config, 10, params)[0])
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (4, 2, 2, 3), np.uint8),
              "label": rng.integers(0, 5, (4,), np.int32)} for _ in range(4)]
  results = []
  for t in (tx, plain):
    graphdef, abstract = steps.abstract_train_state(build_model, t)
    shardings = sharding.state_shardings(abstract, mesh, ())
    step = steps.make_train_step(
        graphdef, t, schedule, shardings, sharding.batch_sharding(mesh),
        loss_kwargs=dict(loss_type="softmax", label_smoothing=0.1, weights=None),
        normalization=((100.0,) * 3, (10.0,) * 3), poison_steps=(2,))  # the guard too
    state = steps.init_train_state(build_model, t, shardings)
    metrics = []
    for batch in batches:
      state, m = step(state, batch)
      metrics.append(m)
    results.append(jax.device_get((state["params"], state["opt_state"], metrics)))
  norms = [float(m["grad_norm"]) for m in results[0][2]]
  assert [int(m["nonfinite"]) for m in results[0][2]] == [0, 1, 0, 0]
  assert min(norms[::2]) < 24.0 < max(norms[2:]), norms
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
