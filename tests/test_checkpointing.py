"""Checkpoints on real files, in process: topology changes, corruption, full disk,
best-metric retention, fine-tuning init and the non-finite step guard."""

import glob
import os
import resource
import shutil

import jax
import numpy as np
import pytest

from configs import demo
from mrl_jax import (checkpoint_read, checkpointing, config_checks, data, experiment,
                     save_timer, sharding)
from mrl_jax.data import pipeline
from mrl_jax.errors import CheckpointError, ConfigError
from mrl_jax.tools import benchmark_checkpoint

FSDP8 = {"data": 1, "fsdp": 8, "model": 1}
ONE = {"data": 1, "fsdp": 1, "model": 1}  # where the mesh does not matter: compiles fastest


def _config(**checkpoint):
  c = demo.get_config("runlocal,synthetic")
  c.model.name, c.model.variant = "vit", "mu/4"
  c.model.options = {"dropout": 0.1}  # dropout rng state must survive a restore too
  c.mrl.nesting = (4, 8, 16, 32)
  c.input.image_size = 16
  c.checkpoint.update(checkpoint)
  return c


def _build(config, mesh_shape):
  config.mesh.update(mesh_shape)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
  return experiment.build_experiment(config, mesh, total_steps=10), mesh


def _host_iterator(config):
  source = data.build_source(config.input, "train", num_classes=config.num_classes)
  return pipeline.train_iterator(
      source, data.build_preprocess(config.input, "train", num_classes=config.num_classes),
      global_batch=config.input.batch_size, seed=config.seed,
      num_classes=config.num_classes)


def _host(tree):
  """Numpy copies (typed PRNG keys as their raw bits), for comparing values."""
  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """Two trained steps on an 8-device fsdp mesh, each saved; host copies kept."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config()
  exp, mesh = _build(config, FSDP8)
  ckpt = checkpointing.Checkpointer(workdir, config, exp.dims, mesh)
  host_it = _host_iterator(config)
  state, saved = exp.state, {}
  for step in (1, 2):
    state, _ = exp.train_step(state, pipeline.to_global(next(host_it), exp.batch_sharding))
    saved[step] = _host(state)
    assert ckpt.maybe_save(step, state, host_it.get_state(), force=True)
  ckpt.close()
  # The batch this run would have trained on next: a resumed run must get it too.
  return dict(workdir=workdir, saved=saved, next_batch=next(host_it))


@pytest.mark.parametrize("mesh_shape", [ONE, {"data": 4, "fsdp": 1, "model": 2}])
def test_restores_onto_another_mesh_in_its_shardings(saved_run, mesh_shape):
  config = _config()
  exp, mesh = _build(config, mesh_shape)
  ckpt = checkpointing.Checkpointer(saved_run["workdir"], config, exp.dims, mesh)
  host_it = _host_iterator(config)
  state, step = ckpt.restore_or_init(exp.state, host_it)
  ckpt.close()
  assert step == 2
  _assert_trees_equal(_host(state), saved_run["saved"][2])
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(exp.state_shardings)):
    assert got.sharding == want
  # The data position too: the next batch is the one the saving run would have used.
  _assert_trees_equal(next(host_it), saved_run["next_batch"])


def test_a_checkpoint_of_another_model_stops_the_run_and_is_left_alone(saved_run):
  config = _config()
  config.mrl.nesting = (8, 16, 32)  # another head: the user reused a workdir
  exp, mesh = _build(config, ONE)
  ckpt = checkpointing.Checkpointer(saved_run["workdir"], config, exp.dims, mesh)
  with pytest.raises(ConfigError, match="holds a different train state"):
    ckpt.restore_or_init(exp.state, _host_iterator(config))
  ckpt.close()
  assert sorted(os.listdir(os.path.join(saved_run["workdir"], "checkpoints"))) == ["1", "2"]


# Orbax's failed reads/writes leave a callback on a closed asyncio loop: noise, not a leak.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_is_set_aside_and_previous_used(saved_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run["workdir"], workdir)
  chunks = glob.glob(f"{workdir}/checkpoints/2/state/**/d/*", recursive=True)
  assert chunks
  for chunk in chunks:  # torn writes: the second half of every data file is gone
    with open(chunk, "r+b") as f:
      f.truncate(os.path.getsize(chunk) // 2)
  config = _config()
  exp, mesh = _build(config, ONE)
  ckpt = checkpointing.Checkpointer(workdir, config, exp.dims, mesh)
  state, step = ckpt.restore_or_init(exp.state, _host_iterator(config))
  assert step == 1
  _assert_trees_equal(_host(state), saved_run["saved"][1])
  aside = glob.glob(f"{workdir}/checkpoints/2.corrupt-*")
  assert len(aside) == 1 and os.path.exists(aside[0] + chunks[0][len(f"{workdir}/checkpoints/2"):])
  # Training goes on: the next save at step 2 lands beside the set-aside one.
  assert ckpt.maybe_save(2, state, {"grain": {}, "skipped": 0}, force=True)
  ckpt.close()
  assert sorted(os.listdir(f"{workdir}/checkpoints"))[:2] == ["1", "2"]


# Orbax's failed reads/writes leave a callback on a closed asyncio loop: noise, not a leak.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_fails_clearly_and_keeps_previous_checkpoints(saved_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run["workdir"], workdir)
  config = _config()
  exp, mesh = _build(config, ONE)
  ckpt = checkpointing.Checkpointer(workdir, config, exp.dims, mesh)
  state, _ = ckpt.restore_or_init(exp.state, _host_iterator(config))
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, hard))  # files over 16 KiB: EFBIG
  try:
    with pytest.raises(CheckpointError) as error:
      ckpt.maybe_save(3, state, {"grain": {}, "skipped": 0}, force=True)
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  message = str(error.value)
  assert "step 3" in message and "[1, 2]" in message and "intact" in message, message
  steps = [n for n in os.listdir(f"{workdir}/checkpoints") if n.isdigit()]
  assert sorted(steps) == ["1", "2"]
  reopened = checkpointing.Checkpointer(workdir, config, exp.dims, mesh)
  restored, step = reopened.restore_or_init(exp.state, _host_iterator(config))
  reopened.close()
  assert step == 2
  _assert_trees_equal(_host(restored), saved_run["saved"][2])


def test_unwritable_workdir_is_reported_before_anything_runs(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError, match="writable directory"):
    checkpointing.check_writable(str(blocker / "workdir"))


def test_keeps_the_latest_and_the_best_by_metric(saved_run, tmp_path):
  config = _config(keep=1, best_metric="val/top1_d32", keep_best=1)
  exp, mesh = _build(config, ONE)
  ckpt = checkpointing.Checkpointer(str(tmp_path), config, exp.dims, mesh)
  for step, top1 in zip((1, 2, 3, 4), (0.5, 0.9, 0.3, 0.4)):
    metrics = {f"val/top1_d{m}": top1 for m in exp.dims}
    ckpt.maybe_save(step, exp.state, {}, metrics=metrics)
  ckpt.close()
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [2, 4]
  with pytest.raises(ConfigError, match="val/top1_d999"):
    checkpointing.Checkpointer(str(tmp_path), _config(best_metric="val/top1_d999"),
                               exp.dims, mesh)


def test_fine_tuning_loads_the_selected_params_that_fit(saved_run):
  config = _config()
  config.num_classes = 12  # another head: its kernels and biases cannot be loaded
  exp, _ = _build(config, {"data": 2, "fsdp": 4, "model": 1})
  fresh = _host(exp.state["params"])
  saved = saved_run["saved"][2]["params"]
  for regex in ("", "^backbone/"):
    params, report = checkpoint_read.init_params(saved_run["workdir"], exp.state["params"],
                                                 regex)
    got = _host(params)
    loaded = ("backbone",) if regex else ("backbone", "neck")  # the neck fits too
    for name in ("backbone", "neck", "head"):
      for x, s, f in zip(jax.tree.leaves(got[name]), jax.tree.leaves(saved[name]),
                         jax.tree.leaves(fresh[name])):
        np.testing.assert_array_equal(x, s if name in loaded else f)
    text = "\n".join(report)
    reason = "does not match init_regex" if regex else "in the checkpoint"
    assert all(reason in l for l in report if "not loaded  head/" in l), text
    num_loaded = sum(len(jax.tree.leaves(saved[name])) for name in loaded)
    assert f"{num_loaded} of {len(jax.tree.leaves(fresh))} parameter arrays" in report[0]
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(exp.state_shardings["params"])):
    assert got.sharding == want


def test_non_finite_step_is_not_applied_and_flagged():
  config = _config()
  config.debug_poison_steps = (1,)
  config.optim.warmup_steps = 0  # so that step 2 has a non-zero learning rate
  exp, _ = _build(config, ONE)
  before = _host(exp.state)
  host_it = _host_iterator(config)
  batch_a, batch_b = (pipeline.to_global(next(host_it), exp.batch_sharding) for _ in "ab")
  state, metrics = exp.train_step(exp.state, batch_a)
  after = _host(state)
  assert int(metrics["nonfinite"]) == 1 and np.isnan(float(metrics["loss"]))
  assert int(after["step"]) == 1  # the counter advances, nothing else changes
  for key in ("params", "opt_state", "model_state"):
    _assert_trees_equal(after[key], before[key])
  state, metrics = exp.train_step(state, batch_b)  # not poisoned: applied as usual
  assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
  head_now, head_before = (jax.tree.leaves(t["head"]) for t in (_host(state["params"]),
                                                               before["params"]))
  assert all(not np.array_equal(a, b) for a, b in zip(head_now, head_before))


def test_benchmark_times_async_and_sync_saves_of_the_real_state(tmp_path):
  config = _config()
  config.mesh.update(FSDP8)  # the tool uses every device
  result = benchmark_checkpoint.benchmark(config, repeats=1, workdir=str(tmp_path))
  exp, _ = _build(_config(), ONE)
  nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(_host(exp.state)))
  assert result["state_mib"] == round(nbytes / 2**20, 1)
  assert 0 < result["async_blocking_s"] <= result["async_total_s"]
  # Sync: the save is the whole write (its rounded ms may still tick over during wait()).
  sync = result["sync_blocking_s"]
  assert 0 < sync <= result["sync_total_s"] <= sync + 0.002
  assert sorted(os.listdir(tmp_path / "sync" / "checkpoints")) == ["1"]  # keep=1 at work


class _FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class _NoData:
  def set_state(self, state):
    self.state = state


def _tiny_state(step, mesh):
  """A two-leaf sharded train state: a real save of it takes a fraction of a second."""
  fsdp = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  return {"params": {"w": jax.device_put(np.arange(16, dtype=np.float32) * step, fsdp)},
          "step": jax.device_put(np.int32(step), jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec()))}


def test_a_save_every_minutes_of_wall_time_between_step_intervals(tmp_path):
  config = _config(every_steps=1000, every_minutes=1.0)
  mesh = sharding.make_mesh(dict(config.mesh, **FSDP8), jax.devices())
  clock = _FakeClock()
  ckpt = checkpointing.Checkpointer(str(tmp_path), config, (4, 8), mesh, clock=clock)
  saved = []
  for step in range(1, 6):  # 20 s a step: the minute is up at step 3, then at step 6
    clock.now = 20.0 * step
    if ckpt.maybe_save(step, _tiny_state(step, mesh), {"position": step}):
      saved.append(step)
  ckpt.close()
  assert saved == [3]  # not before the minute, and the clock restarts at each save
  assert sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == ["3"]
  reopened = checkpointing.Checkpointer(str(tmp_path), config, (4, 8), mesh, clock=clock)
  data_iterator = _NoData()
  state, step = reopened.restore_or_init(_tiny_state(0, mesh), data_iterator)
  reopened.close()
  assert step == 3 and data_iterator.state == {"position": 3}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(16) * 3)

  config.checkpoint.every_minutes = 0.0  # off: only the step interval (and force) save
  off = checkpointing.Checkpointer(str(tmp_path / "off"), config, (4, 8), mesh, clock=clock)
  clock.now = 1e6
  assert not off.maybe_save(4, _tiny_state(4, mesh), {})
  off.close()


def test_with_several_processes_the_time_is_checked_a_few_times_per_interval():
  """Process 0's clock decides, broadcast at steps every process knows in advance;
  at a steady pace the checks land on the first step past each deadline."""
  clock = _FakeClock()
  trigger = save_timer.SaveTimer(10.0, clock, num_processes=2)
  saves = []
  for step in range(1, 3001):  # one step a second: 600 steps per 10 minutes
    clock.now = float(step)
    if trigger.due(step):
      trigger.saved()
      saves.append(step)
  assert saves == [600, 1200, 1800, 2400, 3000]
  assert trigger.broadcasts <= 5 * len(saves), trigger.broadcasts  # not one per step


def test_a_negative_every_minutes_is_rejected_with_the_fix():
  config = _config(every_minutes=-1.0)
  with pytest.raises(ConfigError, match="--config.checkpoint.every_minutes"):
    config_checks.check_config(config, data_parallel=1)
