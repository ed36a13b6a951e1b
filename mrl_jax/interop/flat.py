"""A model's variables as a flat dict of named numpy arrays, and back (see __init__.py)."""

import inspect
from typing import Any, Dict, Mapping, Tuple

import jax
import numpy as np
from flax import nnx

from mrl_jax import experiment, sharding, steps
from mrl_jax.errors import ConfigError

GROUPS = ("params", "model_state")


def flatten(params: Any, model_state: Any) -> Dict[str, np.ndarray]:
  """{"params/<path>": array, "model_state/<path>": array} of the float leaves (host
  copies). Non-array state such as dropout rng keys is not a weight and is left out."""
  flat = {}
  for group, tree in zip(GROUPS, (params, model_state)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if _is_weight(leaf):
        flat[f"{group}/{sharding.path_string(path)}"] = np.asarray(jax.device_get(leaf))
  return flat


def expected_shapes(config: Any) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
  """{flat name: (shape, dtype)} of the model `config` builds (built abstractly)."""
  _, params, model_state = steps.split_model(nnx.eval_shape(experiment.model_factory(config)))
  shapes = {}
  for group, tree in zip(GROUPS, (params, model_state)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if _is_weight(leaf):
        shapes[f"{group}/{sharding.path_string(path)}"] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return shapes


def model_template(config: Any) -> Tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params, model_state) of the model `config` builds: the params
  only as shapes (`into_state` fills them), the rest of the state made for real (rng
  keys and counters are not weights; XLA drops the params' initialisation)."""
  build_model = experiment.model_factory(config)
  graphdef, params, _ = steps.split_model(nnx.eval_shape(build_model))
  model_state = jax.jit(lambda: steps.split_model(build_model())[2])()
  return graphdef, params, model_state


def check_names(flat: Mapping[str, np.ndarray], expected: Mapping[str, Tuple], *,
                source: str) -> None:
  """Every expected name present with its shape, nothing else; else one ConfigError that
  lists the missing, unexpected and wrong-shaped names (the first few of each)."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(f"{k}: {tuple(np.shape(flat[k]))} instead of {expected[k][0]}"
                 for k in set(flat) & set(expected) if tuple(np.shape(flat[k])) != expected[k][0])
  if missing or unexpected or wrong:
    parts = [f"{len(v)} {what} ({few(v)})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong)) if v]
    raise ConfigError(f"{source} does not fit the configured model: " + "; ".join(parts)
                      + ". Check the model variant, head mode, nesting and num_classes.")


def into_state(flat: Mapping[str, np.ndarray], params: Any, model_state: Any,
               *, source: str) -> Tuple[Any, Any]:
  """(params, model_state) with every weight leaf replaced by `flat`'s array of its name
  (cast to the leaf's dtype); the names and shapes must match exactly (`check_names`)."""
  expected = {}
  for group, tree in zip(GROUPS, (params, model_state)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if _is_weight(leaf):
        expected[f"{group}/{sharding.path_string(path)}"] = (tuple(leaf.shape), leaf.dtype)
  check_names(flat, expected, source=source)

  def fill(group, tree):
    def one(path, leaf):
      if not _is_weight(leaf):
        return leaf
      return np.asarray(flat[f"{group}/{sharding.path_string(path)}"]).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(one, tree)

  return fill("params", params), fill("model_state", model_state)


def _is_weight(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating)


def few(names, n: int = 5) -> str:
  """The first `n` names, and how many more, for an error message."""
  return ", ".join(names[:n]) + (f", … {len(names) - n} more" if len(names) > n else "")


def head_overrides(classes: int, mode: str, nesting: Tuple[int, ...], ff_dim: int
                   ) -> Dict[str, Any]:
  """The config settings of a detected head, as every converter's `detect` returns them."""
  return {"num_classes": int(classes), "mrl.mode": mode,
          "mrl.nesting": tuple(int(m) for m in nesting), "mrl.ff_dim": int(ff_dim)}


def reads_as(found: Mapping[str, Any], config: Any, backbone_class: type) -> str:
  """' The file reads as: key=value (configured: …), …' for the settings a converter's
  `detect` found that differ from `config` (a backbone option the config leaves out
  counts at its constructor default), or ''."""
  defaults = {f"model.options.{name}": p.default for name, p in
              inspect.signature(backbone_class.__init__).parameters.items()
              if p.default is not inspect.Parameter.empty}
  differ = []
  for key, value in found.items():
    node = config
    for part in key.split("."):
      node = node.get(part) if hasattr(node, "get") else None
    node = defaults.get(key) if node is None else node
    if isinstance(value, tuple):
      node = tuple(node or ())
    if node != value:
      differ.append(f"{key}={value!r} (configured: {node!r})")
  return f" The file reads as: {', '.join(differ)}." if differ else ""
