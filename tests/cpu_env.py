"""The XLA settings of the test processes: the pytest process itself and the subprocesses
that run the CLIs as a user does.

In the pytest process `--xla_backend_optimization_level=0` skips LLVM's
optimisations: those tests compile many small programs and run each a few
steps, so compiling dominates, and this halves their time (the sharded ResNet
step test: 160 s → 94 s on 2 cores) with the same maths. Subprocesses train
and evaluate for real (the demo learns the digits), where unoptimised
convolutions cost more than the compile saves, so they run optimised code.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = False) -> str:
  flags = f"--xla_force_host_platform_device_count={devices}"
  return f"{flags} {FAST_COMPILE}" if fast_compile else flags


def env(devices: int, **extra) -> dict:
  """os.environ for a CPU-only JAX subprocess with `devices` fake devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
