"""Every test process sees 8 CPU devices, so sharding is tested for real.

Also: the slowest files first (pytest.ini spreads whole files over the workers, so a
long file started last would leave the others idle), the `bucket` fixture (an offline
gs://, tests/fake_bucket.py), the session's shared compilation cache for subprocesses
(tests/cpu_env.py), and the check that a test starting a process (tests/cli_runner.py)
is marked e2e.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import cli_runner, cpu_env  # noqa: E402  pylint: disable=wrong-import-position
from tests.fake_bucket import fixture_bucket  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

os.environ.setdefault("XLA_FLAGS", cpu_env.xla_flags(8, fast_compile=True))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _subprocess_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for every subprocess of the session."""
  cpu_env.cache_dir = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """Before the item's fixtures, so a module fixture that starts a process is checked too."""
  cli_runner.current_test = item.nodeid
  cli_runner.current_test_is_e2e = item.get_closest_marker("e2e") is not None


def pytest_runtest_teardown(item):  # pylint: disable=unused-argument
  cli_runner.current_test = cli_runner.current_test_is_e2e = None


def pytest_collection_modifyitems(items):
  """Files with more `slow` tests first, each file's own order kept (a stable sort)."""
  slow = {}
  for item in items:
    slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
  items.sort(key=lambda item: -slow[item.path])
