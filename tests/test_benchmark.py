"""The train-throughput benchmark runs a real sharded step and reports its figures."""

import glob
import json

import jax
import jax.numpy as jnp
import pytest

from configs import vit_jft
from mrl_jax import experiment
from mrl_jax.errors import UserError
from mrl_jax.tools import benchmark_train
from tests import cpu_env


def test_benchmark_reports_throughput_and_a_profile_for_a_multi_label_config(tmp_path):
  config = vit_jft.get_config("runlocal")
  result = benchmark_train.benchmark(config, num_steps=2, warmup=1, profile_dir=tmp_path)
  assert result["img_per_sec"] > 0 and result["step_ms"] > 0
  assert result["devices"].startswith("8 x ")  # the 8-device mesh of the tests
  assert result["batch"] == 16 and result["final_loss"] > 0
  assert result["tflop_per_step"] > 0 and result["mfu"] is None  # no peak for a CPU
  assert glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
  kernels = result["kernels"]  # read back from the trace
  assert kernels and all(n > 0 and ms >= 0 for _, n, ms, _ in kernels)
  assert "kernel" in benchmark_train.format_kernels(kernels)


def test_peak_tflops_by_device_kind():
  peak = benchmark_train.peak_tflops
  assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989.0
  assert (peak("TPU v5 lite"), peak("TPU v5"), peak("TPU v6 lite")) == (197.0, 459.0, 918.0)
  assert peak("cpu") is None and peak("cpu", 1.5) == 1.5
  # The sweep scores every row of the same work with the baseline's FLOPs.
  row = lambda name, devices, ms, **kw: dict(
      variant=name, devices=devices, batch=256, image_size=224, step_ms=ms,
      img_per_sec=256e3 / ms, compile_s=1.0, peak_gib=None, **kw)
  rows = [row("baseline", "1 x NVIDIA H100", 100.0, tflop_per_step=49.45),
          row("fast", "1 x NVIDIA H100", 50.0, tflop_per_step=1.0),  # a custom call hid FLOPs
          row("torch.compile vit_b16", "NVIDIA H100", 80.0),
          dict(variant="broken", error="exit 1: Unknown flag")]
  benchmark_train._share_model_flops(rows, None)  # pylint: disable=protected-access
  assert [round(r.get("mfu", 0), 3) for r in rows] == [0.5, 1.0, 0.625, 0]
  table = benchmark_train.format_table(rows)
  assert "50.0%" in table and "62.5%" in table and "broken" in table and "failed" in table


def test_custom_calls_of_a_compiled_program_are_listed():
  # What tells a GPU run that cuDNN attention (`__cudnn$fmha...`) really ran; on a CPU,
  # eigh calls LAPACK.
  hlo = jax.jit(jnp.linalg.eigh).lower(jnp.eye(4)).compile().as_text()
  assert any("syevd" in t for t in benchmark_train.custom_call_targets(hlo))
  row = dict(variant="cudnn", devices="1 x H100", batch=8, image_size=224, step_ms=1.0,
             img_per_sec=8e3, compile_s=1.0, custom_calls=["__cudnn$fmhaSoftmax"])
  assert "custom calls, cudnn: __cudnn$fmhaSoftmax" in benchmark_train.format_table([row])


def test_presets_load_and_only_keeps_the_named_variants_in_order():
  for preset in benchmark_train.presets():
    sweep = benchmark_train.load_sweep(preset)
    # Every override names a real field or option (built on the config's small model).
    base = benchmark_train.load_config(sweep["config"].split(":")[0] + ":runlocal")
    for variant in sweep["variants"]:
      experiment.embedding_width(benchmark_train.variant_config(base, variant))
  sweep = benchmark_train.load_sweep("vit_levers", ["all", "baseline"])
  assert [v["name"] for v in sweep["variants"]] == ["baseline", "all"]
  with pytest.raises(UserError, match=r"--only names \['nope'\]"):
    benchmark_train.load_sweep("vit_levers", ["baseline", "nope"])


@pytest.mark.e2e
@pytest.mark.slow
def test_sweep_prints_one_table_with_a_row_per_variant(tmp_path):
  # The flagged variant runs in its own process, its flag added to XLA_FLAGS in place of
  # the inherited one of the same name: 2 devices instead of this process's 8.
  sweep_path = tmp_path / "sweep.json"
  sweep_path.write_text(json.dumps({"config": "configs/vit_jft.py:runlocal", "variants": [
      {"name": "plain"},
      {"name": "flagged", "xla_flags": "--xla_force_host_platform_device_count=2"}]}))
  sweep = benchmark_train.load_sweep(str(sweep_path))
  rows = benchmark_train.sweep(
      sweep, benchmark_train.load_config(sweep["config"]), 2, 1, torch=False,
      argv=[f"--sweep={sweep_path}", "--steps=2", "--warmup=1"])  # as the test above
  assert [r["variant"] for r in rows] == ["plain", "flagged"]
  assert rows[0]["xla_flags"] == cpu_env.xla_flags(8, fast_compile=True)
  assert rows[1]["xla_flags"] == f"{cpu_env.FAST_COMPILE} --xla_force_host_platform_device_count=2"
  assert [r["devices"].split(" x ")[0] for r in rows] == ["8", "2"]
  table = benchmark_train.format_table(rows).splitlines()
  assert table[0].split()[:3] == ["variant", "img/s", "ms/step"]
  for name in ("plain", "flagged"):
    row = next(line for line in table if line.startswith(name)).split()
    assert float(row[1]) > 0 and row[3] == "n/a", table  # img/s; no MFU on a CPU
  assert any(line.startswith("versions: jax ") for line in table)


def test_embed_benchmark_reports_the_forward_and_the_jpeg_path():
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mrl_jax.tools import benchmark_embed  # pylint: disable=import-outside-toplevel
  config = demo.get_config("runlocal")
  config.model.options.width = 8
  result = benchmark_embed.benchmark(config, batch=8, batches=1, dim=16)
  assert result["forward_img_per_sec"] > 0 and result["from_jpeg_img_per_sec"] > 0
  assert (result["dim"], result["image_size"]) == (16, 32)
