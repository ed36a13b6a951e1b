"""The input benchmark CLI runs as users run it and reports a positive rate for everything."""

import json

import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests import cli_runner

pytestmark = pytest.mark.e2e
CANDIDATES = {"pillow_train", "pillow_eval", "mrl_jax_train", "mrl_jax_eval",
              "decode_pillow", "decode_simplejpeg", "decode_opencv"}


def run_benchmark(*flags):
  return cli_runner.run_module("mrl_jax.tools.benchmark_input", *flags, timeout=120)


def test_generated_images_give_per_core_rates_and_speedups(tmp_path):
  json_out = tmp_path / "input.json"
  proc = run_benchmark("--num_images=8", "--passes=1", f"--json_out={json_out}")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result["img_per_sec_per_core"]) == CANDIDATES
  assert all(rate > 0 for rate in result["img_per_sec_per_core"].values())
  assert set(result["speedup_vs_pillow"]) == {"train", "eval"}
  assert all(v > 0 for v in result["speedup_vs_pillow"].values())
  assert result["num_images"] == 8 and 330 <= result["mean_hw"][0] <= 375
  assert 400 <= result["mean_hw"][1] <= 500 and result["mean_kb"] > 20
  assert {"python", "numpy", "pillow", "simplejpeg", "opencv"} <= set(result["versions"])
  assert result["cpu"] and result["cores"] >= 1
  assert json.loads(json_out.read_text()) == result
  assert "speedup vs pillow" in proc.stdout


def test_a_folder_of_real_jpegs_is_read(tmp_path):
  digits = load_digits().images
  folder = tmp_path / "photos" / "nested"
  folder.mkdir(parents=True)
  for i in range(3):  # real handwritten digits, upscaled to a photo-like size
    digit = (digits[i] * 255 / 16).astype("uint8")
    Image.fromarray(digit).resize((320, 240)).convert("RGB").save(folder / f"{i}.JPEG")
  (folder / "notes.txt").write_text("not an image")
  proc = run_benchmark(f"--image_dir={tmp_path / 'photos'}", "--passes=1")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["num_images"] == 3 and result["mean_hw"] == [240, 320]
  assert all(rate > 0 for rate in result["img_per_sec_per_core"].values())
  missing = run_benchmark(f"--image_dir={tmp_path / 'empty'}", "--passes=1")
  assert missing.returncode != 0 and "No .jpg/.jpeg files" in missing.stderr
