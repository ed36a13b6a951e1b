"""A step directory as Orbax is told it, and reading a run's steps from outside the run.

A step directory holds three items, each with its Orbax handler (`manager`):
  state/  the train state (params, BatchNorm statistics, optimizer state, step)
          as sharded arrays: each process writes its shards, and a restore
          reads straight into whatever shardings the target mesh wants;
  data/   the input pipeline's position, one `process_<i>-of-<n>.json` per
          process (each host reads its own shard of the data);
  meta/   the resolved config, model, nesting dims, mesh, process count.
checkpointing.py's Checkpointer writes and resumes a run's own steps with this
layout and `verify`. The readers here, `init_params` (fine-tuning from another
run) and `restore_state` (evaluation and embedding outside training), open a
run read only: a step asked for by name that fails its manifest raises, naming
the file; nothing is set aside or removed.
"""

import functools
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mrl_jax import checkpoint_manifest, paths, sharding
from mrl_jax.errors import CheckpointError, MissingFileError


def data_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@functools.lru_cache(maxsize=None)
def _whole_replicated_arrays_on_cpu() -> None:
  """One replica writes each replicated array whole: Orbax's replica-parallel slices
  cost a compilation per array shape on a process's first save (seconds on 8 CPU
  devices), for nothing when the devices share a disk. Either restores either way."""
  if jax.default_backend() == "cpu":
    default = ocp.type_handlers.get_type_handler(jax.Array)
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,  # and Orbax's per-array metadata files, as before
        array_metadata_store=getattr(default, "_array_metadata_store", None)), override=True)


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  _whole_replicated_arrays_on_cpu()
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  # primary_host=None: every process writes (and reads) its own data position.
  per_process = ocp.JsonCheckpointHandler(
      filename=data_file(),
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("data", args, per_process)
    registry.add("meta", args)
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore, ocp.args.PyTreeRestore):
    registry.add("state", args)
  return registry


def manager(directory: epath.Path, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def verify(step_dir: epath.Path, checksums: bool) -> Optional[Exception]:
  """None if the step matches its manifest (or has none), else what differs, on every
  process: process 0 reads the files (once, not once per host) and the others take
  its verdict, all before Orbax is asked for the step."""
  error = None
  if jax.process_index() == 0:
    error = checkpoint_manifest.check(step_dir, checksums=checksums)
  if all_processes_agree(error is None):
    return None
  return error or RuntimeError("process 0 found a file that differs from the manifest")


def _steps(directory: epath.Path) -> List[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _resolve(init_from: str) -> Tuple[epath.Path, int]:
  """(checkpoints directory, step) from a workdir, a checkpoints dir or a step dir."""
  path = paths.as_path(init_from)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  steps = _steps(path) if path.is_dir() else []
  if not steps:
    raise MissingFileError(
        f"--config.checkpoint.init_from={init_from}: no checkpoint found there (looked for "
        f"{path}/<step>/state). Pass a run's workdir, its checkpoints/ directory or a step "
        "directory.")
  return path, steps[-1]


def _check_requested(directory: epath.Path, step: int, checksums: bool, fix: str) -> None:
  """A step asked for by name is not swapped for another: a mismatch stops, naming the file."""
  mismatch = verify(directory / str(step), checksums)
  if mismatch is not None:
    raise CheckpointError(
        f"Checkpoint {directory / str(step)} is corrupt: {mismatch}. (Checked against the "
        f"manifest written when it was saved; the step is left as it is.) {fix}") from mismatch


def init_params(init_from: str, params: Any, regex: str = "", *,
                checksums: bool = True) -> Tuple[Any, List[str]]:
  """Params with the leaves of another run's checkpoint that match `regex` and fit.

  Only parameters are read (no optimizer state, no step), each straight into the
  sharding of the matching leaf of `params`. A leaf is loaded if its path (as in
  "backbone/blocks/0/mlp/fc1/kernel") matches `regex` and the checkpoint has it
  with the same shape; every other leaf keeps its fresh initialisation, and the
  report (also logged) says why. The step is first checked against its manifest
  (`checksums`: the config's checkpoint.verify_checksums; False: sizes only).
  """
  directory, step = _resolve(init_from)
  _check_requested(directory, step, checksums, (
      f"Start from another step of that run (it has steps {_steps(directory)}): "
      f"--config.checkpoint.init_from={directory}/<step>, or restore this one from a backup."))
  mngr = manager(directory, ocp.CheckpointManagerOptions(read_only=True))
  saved = jax.tree_util.tree_flatten_with_path(mngr.item_metadata(step)["state"])[0]
  saved = {sharding.path_string(p): (p, m) for p, m in saved}
  pattern = re.compile(regex or ".*")
  wanted, lines = {}, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = sharding.path_string(path)
    key = f"params/{name}"
    if not pattern.search(name):
      lines.append(f"  not loaded  {name}: does not match init_regex {regex!r}")
    elif key not in saved:
      lines.append(f"  not loaded  {name}: not in the checkpoint")
    elif tuple(saved[key][1].shape) != tuple(leaf.shape):
      lines.append(f"  not loaded  {name}: shape {tuple(leaf.shape)} here, "
                   f"{tuple(saved[key][1].shape)} in the checkpoint")
    else:
      wanted[key] = (saved[key][0], leaf)
      lines.append(f"  loaded      {name} {tuple(leaf.shape)}")
  restored = _restore_subset(mngr, step, wanted) if wanted else {}
  mngr.close()

  def pick(path, leaf):
    return restored.get(f"params/{sharding.path_string(path)}", leaf)

  params = jax.tree_util.tree_map_with_path(pick, params)
  header = (f"Initialised from {directory}/{step}: {len(wanted)} of {len(lines)} parameter "
            "arrays loaded, the others keep their fresh initialisation.")
  logging.info("%s\n%s", header, "\n".join(lines))
  return params, [header] + lines


def _restore_subset(mngr, step: int, wanted: Dict[str, Tuple[Tuple, Any]]) -> Dict[str, Any]:
  """Reads only the `wanted` leaves ({name: (saved key path, target leaf)})."""
  item, restore_args = {}, {}
  for saved_path, leaf in wanted.values():
    keys = [getattr(k, "key", getattr(k, "idx", k)) for k in saved_path]
    node, args_node = item, restore_args
    for k in keys[:-1]:
      node, args_node = node.setdefault(k, {}), args_node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    args_node[keys[-1]] = ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype,
                                               global_shape=leaf.shape)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))["state"]
  flat = jax.tree_util.tree_flatten_with_path(out)[0]
  return {sharding.path_string(p): x for p, x in flat}


def restore_state(workdir: str, target: Any, step: Optional[int] = None, *,
                  checksums: bool = True) -> Tuple[Any, int]:
  """(train state, step) of a run's checkpoint, for evaluation and embedding outside training.

  `workdir` is a run's workdir or its checkpoints/ directory; `step` None → the
  latest. `target` is the abstract train state (jax.ShapeDtypeStruct leaves whose
  `sharding` says where each array goes, e.g. on another mesh than training's);
  the arrays are read straight into those shardings. Read only: nothing is set
  aside or removed (a corrupt step raises, naming it; `checksums` as in init_params).
  """
  path = paths.as_path(workdir)
  directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  mngr = manager(directory, ocp.CheckpointManagerOptions(read_only=True))
  try:
    saved = list(mngr.all_steps())
    if not saved:
      raise MissingFileError(f"No checkpoint in {directory}; train the run first (python -m "
                             "mrl_jax.main --config=... --workdir=...) or point --workdir at "
                             "a run's workdir.")
    step = max(saved) if step is None else int(step)
    if step not in saved:
      raise MissingFileError(f"No checkpoint step {step} in {directory}; it has steps "
                             f"{sorted(saved)}. Pass one of them, or no step for the latest.")
    _check_requested(directory, step, checksums, (
        f"Pass another step with --step (the run has steps {sorted(saved)}), or restore "
        "this one from a backup."))
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  finally:
    mngr.close()
  logging.info("Restored %s/%d for evaluation.", directory, step)
  return state, step
