"""Checkpoints of a run, in `<workdir>/checkpoints/<step>/`: the only module that knows Orbax.

A step directory holds three items, written by one async `CheckpointManager`:
  state/  the train state (params, BatchNorm statistics, optimizer state, step)
          as sharded arrays: each process writes its shards, and a restore
          reads straight into whatever shardings the target mesh wants;
  data/   the input pipeline's position, one `process_<i>-of-<n>.json` per
          process (each host reads its own shard of the data);
  meta/   the resolved config, model, nesting dims, mesh, process count.
A step is saved every `checkpoint.every_steps` steps, and also once
`checkpoint.every_minutes` of wall time have passed since the last save (or
since the Checkpointer was made), so a `kill -9` loses at most that much work.
Orbax writes a step under a temporary name and renames it when complete, so a
process killed mid-save leaves no step directory behind, only a temporary one
that is reported and removed on the next start. A complete step that cannot be
read (a truncated or deleted file) is reported with its path, moved aside to
`<step>.corrupt-<time>` (never deleted), and the previous step is used. So is a
step whose files no longer match the sizes and CRC32s that `<step>/manifest.json`
recorded when it was saved (checkpoint_manifest.py): Orbax stores no checksums.
Paths go through etils.epath, as in Orbax, so `--workdir=gs://bucket/run` works.
"""

import datetime
import functools
import json
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mrl_jax import checkpoint_manifest, paths, save_timer, sharding
from mrl_jax.errors import ConfigError, MissingFileError, UserError

_TMP_MARK = ".orbax-checkpoint-tmp"
_BEST_METRIC = re.compile(r"^val/(top1|top5|loss)_d(\d+)$")


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be written (unwritable directory, full disk), or the one asked
  for is corrupt; the message says which file and what to do."""


def check_writable(workdir: str) -> None:
  """Fails in a second, before any compilation, if `workdir` cannot hold checkpoints."""
  probe = paths.as_path(workdir) / "checkpoints" / f".write_probe_{jax.process_index()}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # OSError, or a store's own errors
    raise CheckpointError(f"Cannot write checkpoints under --workdir={workdir}: {e}. Choose "
                          "a writable directory with free space.") from e


def _check_shared(directory: epath.Path) -> None:
  """All processes must see one directory (each writes its shards into the same step)."""
  if jax.process_count() == 1:
    return
  nonce = int(multihost_utils.broadcast_one_to_all(np.int32(np.random.randint(1 << 30))))
  token = directory / ".shared_check"
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    token.write_text(str(nonce))
  multihost_utils.sync_global_devices("mrl_jax_shared_check_written")
  try:
    ok = token.read_text() == str(nonce)
  except OSError:
    ok = False
  agreed = _all_processes_agree(ok)
  multihost_utils.sync_global_devices("mrl_jax_shared_check_read")
  if jax.process_index() == 0:
    token.unlink()
  if not agreed:
    raise CheckpointError(
        f"Not every process sees the file process 0 wrote in {directory} (process "
        f"{jax.process_index()} {'does' if ok else 'does not'}). Checkpoints need a --workdir "
        "on storage that every host shares (GCS, NFS, Lustre): each host writes its own "
        "shards into the same step.")


def _data_file() -> str:
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
      filename=_data_file(),
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("data", args, per_process)
    registry.add("meta", args)
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore, ocp.args.PyTreeRestore):
    registry.add("state", args)
  return registry


def _manager(directory: epath.Path, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and target shardings of a tree of arrays (what a restore fills)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _shapes(tree: Any) -> Dict[str, Any]:
  """{path: shape} of a state or its saved metadata (None for PRNG keys, which Orbax
  stores as their raw bits with an extra dim)."""
  def shape(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      return None
    return tuple(x.shape)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sharding.path_string(p): shape(x) for p, x in flat}


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _verify(step_dir: epath.Path, checksums: bool) -> Optional[Exception]:
  """None if the step matches its manifest (or has none), else what differs, on every
  process: process 0 reads the files (once, not once per host) and the others take
  its verdict, all before Orbax is asked for the step."""
  error = None
  if jax.process_index() == 0:
    error = checkpoint_manifest.check(step_dir, checksums=checksums)
  if _all_processes_agree(error is None):
    return None
  return error or RuntimeError("process 0 found a file that differs from the manifest")


def _steps(directory: epath.Path) -> List[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class Checkpointer:
  """Saves every `every_steps` and `every_minutes`, at the end and on preemption;
  restores the latest good step.

  `config` is the run's config (its `checkpoint` block sets the policy, the
  rest is stored as metadata); `dims` are the head's nesting dims. `clock`
  (seconds) times `every_minutes`; the interval starts when this is made.
  """

  def __init__(self, workdir: str, config: Any, dims, mesh: jax.sharding.Mesh, *,
               clock: Callable[[], float] = time.monotonic):
    ckpt = config.checkpoint
    self._root = paths.as_path(workdir) / "checkpoints"
    self.directory = os.fspath(self._root)
    self._ckpt = ckpt
    self.track_best = bool(ckpt.best_metric)
    if self.track_best:
      match = _BEST_METRIC.match(ckpt.best_metric)
      if not match or int(match.group(2)) not in dims or ckpt.best_mode not in ("max", "min"):
        raise ConfigError(
            f"--config.checkpoint.best_metric={ckpt.best_metric!r} (mode "
            f"{ckpt.best_mode!r}) is not an eval metric of this run; use val/top1_d<m>, "
            f"val/top5_d<m> or val/loss_d<m> with m in {list(dims)}, and mode max or min.")
    self._meta = {"model": f"{config.model.name} {config.model.variant}",
                  "mrl_mode": config.mrl.mode, "nesting": [int(d) for d in dims],
                  "mesh": {k: int(v) for k, v in mesh.shape.items()},
                  "num_devices": int(mesh.devices.size),
                  "num_processes": jax.process_count(),
                  "config": json.loads(config.to_json_best_effort())}
    self._saving: Optional[int] = None  # the step of the latest save started
    self._timer = save_timer.SaveTimer(ckpt.every_minutes, clock, jax.process_count())
    _check_shared(self._root)
    self._report_unfinished_saves()
    self._mngr = _manager(self._root, self._options())
    self._manifests = checkpoint_manifest.Writer(
        self._root, checksums=ckpt.verify_checksums, enabled=jax.process_index() == 0)

  def _options(self) -> ocp.CheckpointManagerOptions:
    ckpt = self._ckpt
    save = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if ckpt.every_steps > 0:
      save.append(ocp.checkpoint_managers.FixedIntervalPolicy(ckpt.every_steps))
    keep = [ocp.checkpoint_managers.LatestN(n=max(ckpt.keep, 1))]
    best_fn = None
    if self.track_best:
      def best_fn(metrics, name=ckpt.best_metric):
        return float(metrics[name])
      keep.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=ckpt.best_mode == "min", n=ckpt.keep_best,
          keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(save),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
        best_fn=best_fn, best_mode=ckpt.best_mode, cleanup_tmp_directories=True,
        enable_async_checkpointing=ckpt.async_save, create=True)

  def _report_unfinished_saves(self) -> None:
    if jax.process_index() != 0 or not self._root.is_dir():
      return
    for path in sorted(self._root.iterdir()):
      if _TMP_MARK in path.name:
        logging.warning("Found %s, a save that never completed (the process was killed "
                        "while writing it); it is not a checkpoint and is being removed.",
                        path)

  # Restoring.

  def restore_or_init(self, state: Any, data_iterator: Any) -> Tuple[Any, int]:
    """(state, step) of the latest readable checkpoint, else of `init_from`, else as given.

    The arrays are read straight into the shardings of `state` (which may be on
    another mesh than the one that saved them); `data_iterator.set_state` gets
    this process's saved position.
    """
    target = _abstract(state)
    for step in reversed(self._mngr.all_steps()):
      restored = self._try_restore(step, target)
      if restored is not None:
        self._restore_data(step, restored, data_iterator)
        logging.info("Resumed from %s (step %d).", self._step_dir(step), step)
        return restored["state"], step
    if self._ckpt.init_from:
      params, _ = init_params(self._ckpt.init_from, state["params"], self._ckpt.init_regex,
                              checksums=self._ckpt.verify_checksums)
      state = dict(state, params=params)
    return state, 0

  def _try_restore(self, step: int, target: Any) -> Optional[Dict[str, Any]]:
    mismatch = _verify(self._step_dir(step), self._ckpt.verify_checksums)
    if mismatch is not None:  # readable, maybe, but not what was saved
      self._set_aside(step, mismatch)
      return None
    args = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
    if (self._step_dir(step) / "data" / _data_file()).exists():
      args["data"] = ocp.args.JsonRestore()
    restored, error = None, None
    try:  # Any unreadable or missing file lands in `except`.
      saved = self._mngr.item_metadata(step)["state"]
      if saved is None:
        raise FileNotFoundError("its state metadata is missing")
      saved = _shapes(saved)
      self._check_same_model(step, saved, _shapes(target))
      restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
      if int(restored["state"]["step"]) != step:
        raise ValueError(f"it holds the state of step {int(restored['state']['step'])}")
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      restored, error = None, e
    if _all_processes_agree(error is None):
      return restored
    self._set_aside(step, error)
    return None

  def _check_same_model(self, step: int, saved: Dict[str, Any], wanted: Dict[str, Any]):
    """A checkpoint of another model is the user's mistake, not corruption: stop."""
    diff = sorted(set(saved) ^ set(wanted)) or sorted(
        k for k in wanted if wanted[k] is not None and saved[k] != wanted[k])
    if diff:
      raise ConfigError(
          f"Checkpoint {self._step_dir(step)} holds a different train state than this config "
          f"builds (first differences: {diff[:3]}), e.g. another model, head or optimizer. "
          "Use a new --workdir, or start from it with --config.checkpoint.init_from.")

  def _set_aside(self, step: int, error: Optional[Exception]) -> None:
    path = self._step_dir(step)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = path.parent / f"{path.name}.corrupt-{stamp}"
    logging.error("Checkpoint %s cannot be restored (%s: %s). Moving it to %s (kept for "
                  "inspection) and trying the previous checkpoint.", path,
                  type(error).__name__ if error else "another process failed",
                  str(error)[:500] if error else "", aside)
    if jax.process_index() == 0:
      path.rename(aside)
    multihost_utils.sync_global_devices(f"mrl_jax_set_aside_{step}")
    self._mngr.reload()

  def _restore_data(self, step: int, restored: Dict[str, Any], data_iterator: Any) -> None:
    saved_processes = restored["meta"].get("num_processes")
    if "data" not in restored:
      logging.warning(
          "Checkpoint %s was written by %s processes, now there are %d: the saved data "
          "positions do not apply, so the data order restarts from the beginning of "
          "epoch 0 (the model state is restored exactly).", self._step_dir(step),
          saved_processes, jax.process_count())
      return
    data_iterator.set_state(restored["data"])

  def _step_dir(self, step: int) -> epath.Path:
    return self._root / str(step)

  # Saving.

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def describe(self) -> str:
    """Where the last checkpoint is, for messages that end a run."""
    latest = self._mngr.latest_step()
    if latest is None:
      return f"No checkpoint was written yet in {self.directory}."
    return f"The last checkpoint, {self._step_dir(latest)}, is intact."

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step after any host got a preemption notice
    (needs `jax.distributed`; always False in a single process)."""
    return self._mngr.reached_preemption(step)

  def maybe_save(self, step: int, state: Any, data_state: Dict[str, Any], *,
                 metrics: Optional[Dict[str, float]] = None, force: bool = False,
                 nonfinite_steps: int = 0) -> bool:
    """Saves if the policy says so (or `force`); True if a save started.

    Call it at every step, on every process: the time trigger's checks are
    collective steps in a multi-process run.

    With async saves this returns once the arrays are copied off the devices;
    the files are written in the background (`wait()` joins).
    """
    force = force or (self.track_best and metrics is not None)
    self._list_finished_saves()
    if step in self._mngr.all_steps() or not (
        force or self._mngr.should_save(step) or self._timer.due(step)):
      return False
    self._manifests.join()  # before this save's cleanup may delete a step it reads
    self._timer.saved()
    meta = dict(self._meta, step=int(step), nonfinite_steps=int(nonfinite_steps),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat())
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
    self._saving = step
    logging.info("Saving checkpoint step %d to %s.", step, self.directory)
    try:
      started = self._mngr.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if started:
      self._manifests.saved(step)
      if not self._ckpt.async_save:  # complete on return, so with its manifest
        self._manifests.flush(self._mngr.all_steps())
    return started

  def _list_finished_saves(self) -> None:
    """Starts writing the manifests of the saves Orbax has finished (renamed, and the
    steps it drops deleted); a cheap local check, made at every step."""
    if self._manifests.pending and not self._mngr.is_saving_in_progress():
      self._manifests.start(self._mngr.all_steps())

  def wait(self) -> None:
    """Blocks until every started save is complete on disk, with its manifest."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, e) from e
    self._manifests.flush(self._mngr.all_steps() if self._manifests.pending else ())

  def close(self) -> None:
    self.wait()
    self._mngr.close()

  def _save_error(self, step: Optional[int], error: Exception) -> CheckpointError:
    self._mngr.reload()
    kept = self._mngr.all_steps()
    return CheckpointError(
        f"Saving checkpoint step {step} to {self.directory} failed: {type(error).__name__}: "
        f"{error}. The unfinished save was not made a checkpoint; the previous checkpoints "
        f"(steps {list(kept) or 'none'}) are intact. Free disk space or fix the directory's "
        "permissions, then rerun the same command to resume.")


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
  mismatch = _verify(directory / str(step), checksums)
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
  mngr = _manager(directory, ocp.CheckpointManagerOptions(read_only=True))
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
  mngr = _manager(directory, ocp.CheckpointManagerOptions(read_only=True))
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
