"""A run's own checkpoints, in `<workdir>/checkpoints/<step>/`: when to save, and resuming.

One async `CheckpointManager` writes each step in the layout that checkpoint_read.py
defines (state/, data/, meta/); that module also reads steps from outside a run.
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
import json
import os
import re
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mrl_jax import checkpoint_manifest, checkpoint_read, paths, save_timer, sharding
from mrl_jax.errors import CheckpointError, ConfigError

_TMP_MARK = ".orbax-checkpoint-tmp"
_BEST_METRIC = re.compile(r"^val/(top1|top5|loss)_d(\d+)$")


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
  agreed = checkpoint_read.all_processes_agree(ok)
  multihost_utils.sync_global_devices("mrl_jax_shared_check_read")
  if jax.process_index() == 0:
    token.unlink()
  if not agreed:
    raise CheckpointError(
        f"Not every process sees the file process 0 wrote in {directory} (process "
        f"{jax.process_index()} {'does' if ok else 'does not'}). Checkpoints need a --workdir "
        "on storage that every host shares (GCS, NFS, Lustre): each host writes its own "
        "shards into the same step.")


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
    self._mngr = checkpoint_read.manager(self._root, self._options())
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
      params, _ = checkpoint_read.init_params(
          self._ckpt.init_from, state["params"], self._ckpt.init_regex,
          checksums=self._ckpt.verify_checksums)
      state = dict(state, params=params)
    return state, 0

  def _try_restore(self, step: int, target: Any) -> Optional[Dict[str, Any]]:
    mismatch = checkpoint_read.verify(self._step_dir(step), self._ckpt.verify_checksums)
    if mismatch is not None:  # readable, maybe, but not what was saved
      self._set_aside(step, mismatch)
      return None
    args = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
    if (self._step_dir(step) / "data" / checkpoint_read.data_file()).exists():
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
    if checkpoint_read.all_processes_agree(error is None):
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
