"""The GPU XLA flags the programs set: under the user's XLA_FLAGS, only where a GPU may
be used, and only before a backend starts."""

import importlib
import subprocess
import sys
import textwrap

import jax
import pytest

from mrl_jax import xla_flags
from tests import cpu_env

_DEFAULTS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")


@pytest.fixture
def fake_cuda_plugin(tmp_path, monkeypatch):
  """A directory that makes `jax_cuda12_plugin` findable (never imported)."""
  (tmp_path / "jax_cuda12_plugin").mkdir()
  (tmp_path / "jax_cuda12_plugin" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  return tmp_path


def test_user_flags_win_over_defaults():
  assert xla_flags.flag_name("--xla_gpu_autotune_level=2") == "xla_gpu_autotune_level"
  assert (xla_flags.merge("--xla_gpu_autotune_level=2 --xla_dump_to=/tmp/d", _DEFAULTS)
          == "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=2 "
             "--xla_dump_to=/tmp/d")
  assert xla_flags.merge("", _DEFAULTS) == " ".join(_DEFAULTS)
  assert xla_flags.merge("--a=1", ()) == "--a=1"


def test_gpu_is_expected_only_with_a_cuda_plugin_and_platforms_allowing_it(
    fake_cuda_plugin):
  assert xla_flags.gpu_may_be_used({})
  assert xla_flags.gpu_may_be_used({"JAX_PLATFORMS": "cuda,cpu"})
  assert not xla_flags.gpu_may_be_used({"JAX_PLATFORMS": "cpu"})
  assert not xla_flags.gpu_may_be_used({"JAX_PLATFORMS": "tpu"})


def test_without_a_cuda_plugin_nothing_is_set(monkeypatch):
  if any(xla_flags._module_exists(m) for m in xla_flags._CUDA_PLUGIN_MODULES):
    pytest.skip("a real CUDA plugin is installed here")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert not xla_flags.gpu_may_be_used({})
  assert xla_flags.apply_gpu_defaults(_DEFAULTS) == "--xla_force_host_platform_device_count=8"


def test_too_late_once_a_backend_started(fake_cuda_plugin, monkeypatch, caplog):
  jax.devices()  # This process's backend is up: XLA has read its flags.
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_flags.apply_gpu_defaults(_DEFAULTS) == "--xla_force_host_platform_device_count=8"
  assert "before the GPU XLA flags were set" in caplog.text


@pytest.mark.e2e
def test_a_fresh_process_gets_the_defaults_and_xla_accepts_them(fake_cuda_plugin):
  """Set before the backend starts, the user's value kept; XLA's CPU backend parses the
  GPU flags too (so a CUDA install on a machine without a GPU still runs)."""
  code = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {str(fake_cuda_plugin)!r})
      from mrl_jax import xla_flags
      print(xla_flags.apply_gpu_defaults({_DEFAULTS!r}))
      os.environ["JAX_PLATFORMS"] = "cpu"  # the plugin is fake: start the CPU backend
      import jax
      print(jax.numpy.add(1, 2), jax.devices()[0].platform)
      """)
  env = cpu_env.env(1, XLA_FLAGS="--xla_gpu_autotune_level=2")
  del env["JAX_PLATFORMS"]
  proc = subprocess.run([sys.executable, "-c", code], cwd=cpu_env.ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  flags_line, result_line = proc.stdout.strip().splitlines()[-2:]
  assert flags_line == "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=2"
  assert result_line == "3 cpu"
