"""The XLA settings and environment of the test processes: the pytest process itself
and the subprocesses that run the CLIs as a user does (started by tests/cli_runner.py).

In the pytest process `--xla_backend_optimization_level=0` skips LLVM's
optimisations: those tests compile many small programs and run each a few
steps, so compiling dominates, and this halves their time (the sharded ResNet
step test: 160 s → 94 s on 2 cores) with the same maths. Subprocesses train
and evaluate for real (the demo learns the digits), where unoptimised
convolutions cost more than the compile saves, so they run optimised code.

Subprocesses share JAX's persistent compilation cache: one directory per pytest
session (tests/conftest.py sets `cache_dir`), every program written to it however
fast it compiled, so a later run of the same program loads it instead of compiling.
"""

import os
import tempfile
from typing import Optional

FAST_COMPILE = "--xla_backend_optimization_level=0"

# Set by schedulers; a child started inside a SLURM job must not auto-detect it.
CLUSTER_ENV = ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The session's persistent compilation cache (a pytest tmp dir, set by conftest);
# outside pytest, one temporary directory per process, made on first use.
cache_dir: Optional[str] = None


def xla_flags(devices: int, fast_compile: bool = False) -> str:
  flags = f"--xla_force_host_platform_device_count={devices}"
  return f"{flags} {FAST_COMPILE}" if fast_compile else flags


def compilation_cache_dir() -> str:
  global cache_dir
  if cache_dir is None:
    cache_dir = tempfile.mkdtemp(prefix="mrl_jax_test_jax_cache_")
  return cache_dir


def env(devices: int, fast_compile: bool = False, **extra) -> dict:
  """os.environ for a CPU-only JAX subprocess with `devices` fake devices, optimised
  code (unless `fast_compile`: for a child that compiles many small programs and runs
  each briefly, as this process does), the repository importable, no cluster variables,
  the session's compilation cache; `extra` last (it may override any of these)."""
  out = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  out.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices, fast_compile),
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
             JAX_COMPILATION_CACHE_DIR=compilation_cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  out.update(extra)
  return out
