"""Checkpoint manifests on real files: every kept step is listed, a flipped byte or a
truncated file is caught before Orbax reads the step, the checks can be relaxed, and
all of it works on a gs:// bucket.

A two-leaf sharded state through the real Checkpointer keeps each save a fraction
of a second; the files are Orbax's own (OCDBT data files, metadata, JSON items).
"""

import glob
import json
import logging
import os
import shutil
import zlib

import jax
import numpy as np
import pytest
from etils import epath

from configs import demo
from mrl_jax import checkpoint_manifest, checkpoint_read, checkpointing, sharding
from mrl_jax.errors import CheckpointError
from tests.fake_bucket import BUCKET

FSDP8 = {"data": 1, "fsdp": 8, "model": 1}


def _config(**checkpoint):
  c = demo.get_config("runlocal,synthetic")
  c.mesh.update(FSDP8)
  c.checkpoint.update(checkpoint)
  return c


def _mesh():
  return sharding.make_mesh(_config().mesh, jax.devices())


def _state(step, mesh):
  """params/w sharded over 8 devices (one data file per shard set) and a replicated step."""
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec)))
  return {"params": {"w": put(np.arange(4096, dtype=np.float32) * step, ("fsdp",))},
          "step": put(np.int32(step), ())}


class _Data:
  def set_state(self, state):
    self.state = state


def _save(workdir, steps, **checkpoint):
  mesh = _mesh()
  ckpt = checkpointing.Checkpointer(str(workdir), _config(**checkpoint), (4, 8), mesh)
  for step in steps:
    assert ckpt.maybe_save(step, _state(step, mesh), {"position": step}, force=True)
  return ckpt


def _restore(workdir, **checkpoint):
  """(step, w) restored by a fresh Checkpointer, as a resumed run does."""
  mesh = _mesh()
  ckpt = checkpointing.Checkpointer(str(workdir), _config(**checkpoint), (4, 8), mesh)
  state, step = ckpt.restore_or_init(_state(0, mesh), _Data())
  ckpt.close()
  return step, np.asarray(state["params"]["w"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  _save(workdir, (1, 2)).close()
  return workdir


@pytest.fixture
def run(saved, tmp_path):
  """A copy of the two-step run to damage."""
  workdir = tmp_path / "run"
  shutil.copytree(saved, workdir)
  return workdir


def _largest_data_file(workdir, step):
  files = glob.glob(f"{workdir}/checkpoints/{step}/state/**/d/*", recursive=True)
  return max(files, key=os.path.getsize)


def _flip_a_byte(path, offset=None):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2 if offset is None else offset)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _relative(workdir, step, path):
  return os.path.relpath(path, f"{workdir}/checkpoints/{step}")


def _assert_fell_back_naming(workdir, caplog, file, why, **checkpoint):
  with caplog.at_level(logging.ERROR):
    step, w = _restore(workdir, **checkpoint)
  assert step == 1
  np.testing.assert_array_equal(w, np.arange(4096) * 1)
  assert len(glob.glob(f"{workdir}/checkpoints/2.corrupt-*")) == 1  # set aside, kept
  errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
  assert file in errors and why in errors, errors


@pytest.mark.parametrize("async_save", [True, False])
def test_every_kept_step_has_a_manifest_of_all_its_files(tmp_path, async_save):
  ckpt = _save(tmp_path, (1, 2, 3, 4), keep=2, async_save=async_save)
  if not async_save:  # a synchronous save returns with its manifest written
    assert os.path.exists(tmp_path / "checkpoints" / "4" / checkpoint_manifest.NAME)
  ckpt.close()
  root = tmp_path / "checkpoints"
  assert sorted(os.listdir(root)) == ["3", "4"]  # Orbax's cleanup takes the manifests along
  for step in ("3", "4"):
    step_dir = root / step
    listed = json.loads((step_dir / checkpoint_manifest.NAME).read_text())["files"]
    on_disk = sorted(os.path.relpath(os.path.join(d, n), step_dir)
                     for d, _, names in os.walk(step_dir) for n in names)
    assert on_disk == sorted(list(listed) + [checkpoint_manifest.NAME])  # no temporary left
    assert any("/d/" in f for f in listed), listed  # the array data, not only metadata
    for rel, entry in listed.items():
      data = (step_dir / rel).read_bytes()
      assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, rel
  assert _restore(tmp_path)[0] == 4


def test_a_flipped_byte_in_a_data_file_falls_back_to_the_previous_step(run, caplog):
  data_file = _largest_data_file(run, 2)
  _flip_a_byte(data_file)
  _assert_fell_back_naming(run, caplog, _relative(run, 2, data_file), "CRC32")


def test_a_truncated_file_falls_back_to_the_previous_step(run, caplog):
  data_file = _largest_data_file(run, 2)
  with open(data_file, "r+b") as f:
    f.truncate(os.path.getsize(data_file) - 1)
  _assert_fell_back_naming(run, caplog, _relative(run, 2, data_file), "bytes on disk")


def test_with_verify_checksums_off_only_sizes_are_checked(run, caplog):
  # A flip in a file that Orbax never reads back, so only the manifest could see it.
  _flip_a_byte(run / "checkpoints" / "2" / "commit_success.txt", offset=0)
  assert _restore(run, verify_checksums=False)[0] == 2
  assert not glob.glob(f"{run}/checkpoints/2.corrupt-*")
  os.remove(_largest_data_file(run, 2))  # a missing file is found by the listing alone
  _assert_fell_back_naming(run, caplog, "state/", "missing", verify_checksums=False)


def test_a_step_without_a_manifest_restores_with_a_warning(run, caplog):
  os.remove(run / "checkpoints" / "2" / checkpoint_manifest.NAME)  # an older mrl_jax's step
  with caplog.at_level(logging.WARNING):
    step, w = _restore(run)
  assert step == 2
  np.testing.assert_array_equal(w, np.arange(4096) * 2)
  assert any("has no manifest.json" in r.getMessage() for r in caplog.records)


def test_explicitly_requested_corrupt_step_raises_naming_the_file(run):
  data_file = _relative(run, 2, _largest_data_file(run, 2))
  _flip_a_byte(run / "checkpoints" / "2" / data_file)
  mesh = _mesh()
  params = _state(0, mesh)["params"]
  with pytest.raises(CheckpointError) as error:
    checkpoint_read.init_params(str(run / "checkpoints" / "2"), params)
  message = str(error.value)
  assert data_file in message and "init_from=" in message and "[1, 2]" in message, message
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _state(0, mesh))
  with pytest.raises(CheckpointError, match="--step"):
    checkpoint_read.restore_state(str(run), target)  # the latest, 2
  state, step = checkpoint_read.restore_state(str(run), target, step=1)
  assert step == 1 and int(state["step"]) == 1
  assert os.path.isdir(run / "checkpoints" / "2")  # read only: nothing set aside


def test_manifests_and_checks_work_on_a_bucket(saved, bucket):  # pylint: disable=unused-argument
  """gs:// through epath (tests/test_workdir_fs.py's in-memory bucket). Orbax's arrays
  can't go there offline, so a saved step is copied up and our side runs on the copy."""
  checkpointing.check_writable(f"{BUCKET}/run")
  step_dir = epath.Path(f"{BUCKET}/run/checkpoints/2")
  local = saved / "checkpoints" / "2"
  for path in local.rglob("*"):
    if path.is_file() and path.name != checkpoint_manifest.NAME:
      (step_dir / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())
  assert checkpoint_manifest.verify(step_dir, checksums=True) is None  # none yet
  checkpoint_manifest.write(step_dir, checksums=True)
  assert json.loads((step_dir / checkpoint_manifest.NAME).read_text()) == json.loads(
      (local / checkpoint_manifest.NAME).read_text())  # the same listing as on the disk
  assert checkpoint_manifest.verify(step_dir, checksums=True) > 0
  data_file = _relative(saved, 2, _largest_data_file(saved, 2))
  damaged = bytearray((step_dir / data_file).read_bytes())
  damaged[len(damaged) // 2] ^= 0x10
  (step_dir / data_file).write_bytes(bytes(damaged))
  with pytest.raises(CheckpointError, match=data_file):
    checkpoint_read.init_params(f"{BUCKET}/run", {"w": np.zeros(4096, np.float32)})
