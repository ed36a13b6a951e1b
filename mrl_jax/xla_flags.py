"""XLA flags that the programs set for GPU runs, under the user's own `XLA_FLAGS`.

XLA reads `XLA_FLAGS` once, when the first backend starts, so `cli.run` calls
`apply_gpu_defaults()` before any entry point touches a device. The defaults
apply only where a CUDA plugin for JAX is installed and `JAX_PLATFORMS` allows
a GPU; a flag the user already set in `XLA_FLAGS` keeps the user's value. XLA
parses GPU flags on every backend, so a CUDA install without a GPU is unharmed.

`GPU_DEFAULTS` holds only flags that a measurement on a GPU chose: each entry
names the benchmark_train sweep that chose it (docs/benchmarks.md, "Sweeps").
None has been measured yet, so it is empty and the programs run with XLA's own
defaults; the sweep presets try each candidate flag.
"""

import importlib.util
import os
import shlex
from typing import Dict, Sequence, Tuple

from absl import logging

# (flag, why): e.g. ("--xla_gpu_enable_triton_gemm=false", "vit_levers on H100, +N%").
GPU_DEFAULTS: Tuple[Tuple[str, str], ...] = ()

# JAX's CUDA plugins, as modules: the pip wheels jax-cuda12-plugin / jax-cuda13-plugin.
_CUDA_PLUGIN_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def flag_name(flag: str) -> str:
  """'--xla_gpu_autotune_level=2' -> 'xla_gpu_autotune_level'."""
  return flag.lstrip("-").split("=", 1)[0]


def merge(user_flags: str, defaults: Sequence[str]) -> str:
  """`defaults` then `user_flags`, minus every default whose flag the user set."""
  user = shlex.split(user_flags)
  named = {flag_name(f) for f in user}
  return " ".join([f for f in defaults if flag_name(f) not in named] + user)


def gpu_may_be_used(environ: Dict[str, str] = os.environ) -> bool:
  """True when JAX could start a CUDA backend: a CUDA plugin is installed and
  JAX_PLATFORMS (when set) names cuda or gpu. Asking JAX instead would start the
  backend, after which XLA no longer reads its flags."""
  platforms = environ.get("JAX_PLATFORMS", "").lower()
  if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
    return False
  return any(_module_exists(m) for m in _CUDA_PLUGIN_MODULES)


def _module_exists(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # A parent package that is absent or broken.
    return False


def apply_gpu_defaults(defaults: Sequence[str] = tuple(f for f, _ in GPU_DEFAULTS)) -> str:
  """Puts `defaults` into os.environ["XLA_FLAGS"] (the user's flags win) when a GPU
  may be used and no backend has started; returns the XLA_FLAGS in effect."""
  current = os.environ.get("XLA_FLAGS", "")
  if not defaults or not gpu_may_be_used():
    return current
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    logging.warning("A JAX backend started before the GPU XLA flags were set; running "
                    "without %s.", " ".join(defaults))
    return current
  os.environ["XLA_FLAGS"] = merge(current, defaults)
  return os.environ["XLA_FLAGS"]
