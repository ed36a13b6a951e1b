"""The train step's extra passes: its gradient norm is shared with the clip (outputs
identical to optax's clip) and the finite guard's select is fused into the update."""

import re

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


def test_finite_guard_select_fuses_into_the_update():
  """The guard's `where(finite, new, old)` over the whole state costs no pass of its
  own: in the compiled step, every array of the new state comes out of one fusion that
  computes the update and selects it (checked here in the CPU HLO; XLA's GPU fusion
  of elementwise ops does the same)."""
  config = common.get_base_config().optim
  config.name, config.clip_norm = "adamw", 1.0
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
  build_model = lambda: _Toy(nnx.Rngs(0))
  tx, schedule = optim.make_optimizer(config, 10,
                                      steps.split_model(nnx.eval_shape(build_model))[1])
  graphdef, abstract = steps.abstract_train_state(build_model, tx)
  step = steps.make_train_step(
      graphdef, tx, schedule, sharding.state_shardings(abstract, mesh, ()),
      sharding.batch_sharding(mesh),
      loss_kwargs=dict(loss_type="softmax", label_smoothing=0.1, weights=None),
      normalization=((100.0,) * 3, (10.0,) * 3))
  batch = {"image": jax.ShapeDtypeStruct((4, 2, 2, 3), np.uint8),
           "label": jax.ShapeDtypeStruct((4,), np.int32)}
  hlo = step.lower(abstract, batch).compile().as_text()
  computations = {m.group(1): m.group(2) for m in re.finditer(
      r"^%?([\w.-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)}
  entry = re.search(r"^ENTRY [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S).group(1)
  defs = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = (.*)$",
                                                      entry, re.M)}
  root = re.search(r"ROOT %[\w.-]+ = \([^)]*\) tuple\((.*)\)", entry).group(1)
  outputs = re.findall(r"%([\w.-]+)", root)
  leaves = jax.tree.leaves(abstract)
  checked = 0
  for name, leaf in zip(outputs, leaves):  # The new state's leaves come first.
    if not leaf.shape:
      continue
    line = defs[name]
    assert " fusion(" in line, (name, line[:200])
    ops = set(re.findall(r"= \S+ ([\w-]+)\(", computations[re.search(
        r"calls=%([\w.-]+)", line).group(1)]))
    assert "select" in ops and ops & {"add", "multiply", "subtract"}, (name, sorted(ops))
    checked += 1
  assert checked == sum(1 for leaf in leaves if leaf.shape) >= 6  # params, mu, nu
