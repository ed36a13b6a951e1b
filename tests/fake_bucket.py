"""An offline gs:// for tests: fsspec's in-memory file system with an object store's
rules (no directories, no append), registered as `gs://` for one test by the `bucket`
fixture (available to every test through tests/conftest.py). epath sends gs:// to
fsspec, so the code under test runs its real remote branch."""

import importlib
import os

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path

BUCKET = "gs://bucket"


class FakeGCS(MemoryFileSystem):
  """An in-memory gs:// with an object store's rules: no directories, no append."""
  protocol = ("gs", "gcs")
  root_marker = ""
  store = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's kwarg, from epath
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")  # "bucket/key", as gcsfs has it

  def makedirs(self, path, exist_ok=False):
    pass  # a prefix exists once an object is under it

  def mkdir(self, path, create_parents=True, **kwargs):
    pass

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"{path}: an object store has no append ({mode!r}).")
    return super()._open(path, mode, **kwargs)


@pytest.fixture(name="bucket")
def fixture_bucket(monkeypatch, tmp_path):
  """gs:// → FakeGCS, emptied; the working directory is tmp_path/cwd (checked clean)."""
  monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's fsspec backend even with TF about
  # What fsspec.register_implementation(clobber=True) sets, undone after the test.
  implementations = vars(importlib.import_module("fsspec.registry"))["_registry"]
  monkeypatch.setitem(implementations, "gs", FakeGCS)
  monkeypatch.setitem(implementations, "gcs", FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeGCS.store.clear()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield FakeGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  assert not os.listdir(cwd), "a write bypassed mrl_jax.paths (local files appeared)"
