"""The one way the tests start a real process: `python -m <module> ...` as a user runs it.

    proc = cli_runner.run_module("mrl_jax.main", "--config=...", devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli_runner.popen_module("mrl_jax.main", ..., stderr=subprocess.PIPE, text=True)

The child runs from the repository root in tests/cpu_env.py's environment (CPU only,
`devices` fake devices, optimised code, no cluster variables, the session's shared
persistent compilation cache), plus `env_extra`.

A test that starts a process must be marked `e2e` (pytest.ini): tests/conftest.py
tells this module which test is running, and starting a process from an unmarked
test fails it.
"""

import subprocess
import sys
from typing import Optional

from tests import cpu_env

ROOT = cpu_env.ROOT

# The running test (node id) and whether it is marked e2e, set by tests/conftest.py;
# None outside pytest (no check).
current_test: Optional[str] = None
current_test_is_e2e: Optional[bool] = None


def _check_marked() -> None:
  if current_test_is_e2e is False:
    raise AssertionError(f"{current_test} starts a process: mark it @pytest.mark.e2e")


def command(module: str, *args) -> list:
  return [sys.executable, "-m", module, *map(str, args)]


def run_module(module: str, *args, devices: int = 1, timeout: float = 300,
               fast_compile: bool = False,
               env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
  """Runs `python -m module *args` to its end; the CompletedProcess has text stdout and
  stderr, and its return code is the caller's to check. `fast_compile`: unoptimised XLA
  code, as in the pytest process (for a child that compiles much and computes little)."""
  _check_marked()
  return subprocess.run(command(module, *args), cwd=ROOT,
                        env=cpu_env.env(devices, fast_compile, **(env_extra or {})),
                        capture_output=True, text=True, timeout=timeout, check=False)


def popen_module(module: str, *args, devices: int = 1, fast_compile: bool = False,
                 env_extra: Optional[dict] = None, **popen_kwargs) -> subprocess.Popen:
  """Starts `python -m module *args` in run_module's environment; popen_kwargs (stdout=,
  stderr=, text=, ...) go to subprocess.Popen. The caller waits for it (or kills it)."""
  _check_marked()
  return subprocess.Popen(command(module, *args), cwd=ROOT,
                          env=cpu_env.env(devices, fast_compile, **(env_extra or {})),
                          **popen_kwargs)
