"""Device mesh, regex → PartitionSpec rules for the train state, batch sharding.

The mesh has axes ('data', 'fsdp', 'model'). The batch is split over
('data', 'fsdp'); parameters follow the first matching rule of
`config.sharding_rules`, a list of (regex, spec) pairs searched against each
leaf's path in the train state ("params/head/linear/kernel",
"opt_state/0/mu/head/linear/kernel", ...), so the optimizer state follows its
parameter. A spec is either a tuple of mesh axes / None per array dim, or one
of the words:
  "replicate"  a full copy on every device;
  "fsdp"       the largest dim divisible by the fsdp size is split over 'fsdp'.
A spec that does not fit a leaf (wrong rank, indivisible dim) falls back to
"fsdp", so one rule serves a kernel and its factored Adafactor statistics.
"""

import re
from typing import Any, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] = None) -> Mesh:
  """Builds the mesh from {'data': n, 'fsdp': n, 'model': n}; one size may be -1."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  spec = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"Mesh {{{spec}}}: sizes must be positive, with at most one -1 "
                     "(meaning 'all remaining devices').")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"Mesh {{{spec}}}: {len(devices)} devices are not divisible by "
                       f"{known}. Choose sizes whose product divides {len(devices)}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f"Mesh {{{spec}}} has {int(np.prod(sizes))} devices but "
                     f"{len(devices)} are available. Set --config.mesh.data=-1 to use "
                     "all of them, or make the product of the sizes equal the count.")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) dim over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_string(path: Tuple) -> str:
  """'params/backbone/stem_conv/kernel' from a pytree key path (drops `.value`)."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    parts.append(str(name))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def _fits(spec: Tuple, shape: Tuple[int, ...], mesh: Mesh) -> bool:
  if len(spec) != len(shape):
    return False
  for axes, dim in zip(spec, shape):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if dim % int(np.prod([mesh.shape[a] for a in axes])):
      return False
  return True


def _fsdp_spec(shape: Tuple[int, ...], mesh: Mesh) -> P:
  size = mesh.shape["fsdp"]
  if size == 1:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def spec_for(path: str, shape: Tuple[int, ...], mesh: Mesh, rules) -> P:
  """The PartitionSpec of one leaf: the first matching rule that fits it."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if spec == "replicate":
        return P()
      if spec != "fsdp" and _fits(tuple(spec), shape, mesh):
        return P(*spec)
      return _fsdp_spec(shape, mesh)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[Tuple[str, Any]]) -> Any:
  """A pytree of NamedSharding with the structure of `abstract_state`."""
  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, spec_for(path_string(path), shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, abstract_state)


def _num_shards(sharding: NamedSharding) -> int:
  axes = [a for entry in sharding.spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)]
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def describe(shardings: Any, abstract_state: Any, limit: int = 20) -> str:
  """A short table of the parameters split over more than one device, for the log."""
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  for (path, leaf), sharding in zip(flat, jax.tree_util.tree_leaves(shardings)):
    name = path_string(path)
    if name.startswith("params/") and _num_shards(sharding) > 1:
      rows.append(f"  {name} {tuple(leaf.shape)} -> {sharding.spec}")
  shown = rows[:limit] + ([f"  ... and {len(rows) - limit} more"] if len(rows) > limit else [])
  return "\n".join(shown) if rows else "  (all replicated)"
