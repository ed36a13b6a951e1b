"""Device mesh, regex → PartitionSpec rules for the train state, batch sharding.

The mesh has axes ('data', 'fsdp', 'model'); `mesh.data`, `.fsdp` and `.model`
lay out the devices of one slice (one fast interconnect: a TPU slice's ICI, a
GPU node's NVLink). `mesh.dcn_data` = D > 1 joins D such slices over the slower
data-centre network (DCN) as maxtext's `create_device_mesh` does: the 'data'
axis is D × mesh.data long with the slices outermost, so only the gradient
all-reduce crosses the DCN while fsdp and model traffic stays inside a slice,
and no rule below changes. A slice is a TPU slice (the devices' `slice_index`)
where the devices span several, else a process (`mesh.dcn_granule`).

The batch is split over ('data', 'fsdp'). Parameters follow the first matching
rule of `config.sharding_rules`, a list of (regex, spec) pairs searched against each
leaf's path in the train state ("params/head/linear/kernel",
"opt_state/0/mu/head/linear/kernel", ...), so the optimizer state follows its
parameter. A spec is either a tuple of mesh axes / None per array dim, or one
of the words:
  "replicate"  a full copy on every device;
  "fsdp"       the largest dim divisible by the fsdp size is split over 'fsdp'.
A spec that does not fit a leaf (wrong rank, indivisible dim) falls back to
"fsdp", so one rule serves a kernel and its factored Adafactor statistics.
"""

import collections
import re
from typing import Any, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

GRANULES = ("auto", "slice", "process")
# jax.make_mesh lets these TPUs split a physical axis over two mesh axes; each slice's
# part of a hybrid mesh follows the same rule, so a slice is laid out as jax.make_mesh
# lays out a single slice.
_SPLIT_PHYSICAL_AXES = ("TPU v5 lite", "TPU v5e")


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] = None) -> Mesh:
  """The mesh of {'data', 'fsdp', 'model'} (per slice; one size may be -1) and
  'dcn_data' slices (default 1: one mesh over all devices, as `jax.make_mesh`)."""
  devices = list(devices if devices is not None else jax.devices())
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if int(mesh_config.get("dcn_data", 1)) == 1:
    slices = _num_slices(devices)
    if slices > 1:  # jax.make_mesh refuses these.
      raise ConfigError(f"The {len(devices)} devices span {slices} TPU slices: set "
                        f"--config.mesh.dcn_data={slices} (data parallelism between "
                        "slices, fsdp/model inside each).")
    sizes = _ici_sizes(mesh_config, len(devices), "available")
    return jax.make_mesh(sizes, MESH_AXES, devices=devices, axis_types=axis_types)
  return Mesh(device_grid(mesh_config, devices), MESH_AXES, axis_types=axis_types)


def device_grid(mesh_config: Any, devices: Sequence[Any]) -> np.ndarray:
  """The [data, fsdp, model] array of devices for `dcn_data` > 1: one block of the
  'data' axis per slice, in slice order, each laid out for its own interconnect
  (`mesh_utils.create_hybrid_device_mesh`)."""
  dcn = int(mesh_config.get("dcn_data", 1))
  granule = mesh_config.get("dcn_granule", "auto")
  if dcn < 1:
    raise ConfigError(f"mesh.dcn_data={dcn}: it is the number of slices (>= 1; "
                      "1 for a single slice or host).")
  if granule not in GRANULES:
    raise ConfigError(f"mesh.dcn_granule={granule!r}: use one of {GRANULES} (auto: TPU "
                      "slices where the devices span several, else processes).")
  counts = {"slice": _num_slices(devices), "process": len({d.process_index for d in devices})}
  if granule == "auto":
    granule = "slice" if counts["slice"] > 1 else "process"
  count = counts[granule]
  unit = {"slice": "TPU slice", "process": "process"}[granule]
  units = f"{unit}{'es' if unit == 'process' else 's'}"
  if count != dcn:
    other = "process" if granule == "slice" else "slice"
    hint = f", or --config.mesh.dcn_granule={other}" if counts[other] == dcn else ""
    raise ConfigError(f"mesh.dcn_data={dcn}, but the devices are in {count} "
                      f"{unit if count == 1 else units}, and each slice of the 'data' axis "
                      f"is one of them. Set --config.mesh.dcn_data={count} (1: one mesh "
                      f"over all devices){hint}.")
  by_process = granule == "process"
  per_slice = collections.Counter(d.process_index if by_process else d.slice_index
                                  for d in devices)
  if len(set(per_slice.values())) > 1:
    raise ConfigError(f"The {units} hold different numbers of devices "
                      f"({sorted(per_slice.values())}); mesh.dcn_data > 1 needs equal ones.")
  sizes = _ici_sizes(mesh_config, len(devices) // dcn, f"in each of the {dcn} {units}")
  return mesh_utils.create_hybrid_device_mesh(
      sizes, (dcn, 1, 1), devices, process_is_granule=by_process,
      allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES)


def _num_slices(devices: Sequence[Any]) -> int:
  """Distinct `slice_index` values (1 where the platform has none: CPU, most GPUs)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def _ici_sizes(mesh_config: Any, num_devices: int, where: str) -> Tuple[int, ...]:
  """(data, fsdp, model) of `mesh_config` over `num_devices`, the -1 resolved."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  spec = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"Mesh {{{spec}}}: sizes must be positive, with at most one -1 "
                      "(meaning 'all remaining devices').")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"Mesh {{{spec}}}: the {num_devices} devices {where} are not "
                        f"divisible by {known}. Choose sizes whose product divides "
                        f"{num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f"Mesh {{{spec}}} has {int(np.prod(sizes))} devices but "
                      f"{num_devices} are {where}. Set --config.mesh.data=-1 to use "
                      "all of them, or make the product of the sizes equal the count.")
  return tuple(sizes)


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
