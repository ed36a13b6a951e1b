"""The registry of preprocessing ops: a leaf module the op modules register into.

`image_ops` (example ops) and `batch_ops` (mixup, cutmix) register their
factories here on import; `preprocess` imports both and parses specs against
`OPS`. Keeping the registry here, below all three, leaves no import circle.
"""

from mrl_jax.registry import Registry

OPS = Registry("preprocessing op")


def register_op(name: str, *aliases: str, batch: bool = False):
  """Registers an op factory under `name` (and aliases) in OPS.

  `batch=True` marks factories whose ops take a whole host batch; parse()
  keeps those after the example ops. A factory declaring `num_classes`
  receives it from parse() rather than from the spec.
  """
  def decorator(factory):
    factory.is_batch_op = batch
    for n in (name,) + aliases:
      OPS.register(n)(factory)
    return factory
  return decorator
