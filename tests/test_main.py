"""The entry point end to end, in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from tests import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(config, workdir, *overrides, devices=8, timeout=300):
  env = cpu_env.env(devices)
  cmd = [sys.executable, "-m", "mrl_jax.main", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("config", ["demo", "resnet50_i1k", "vit_b16_i1k", "vit_jft"])
def test_runlocal_variant_trains_and_writes_outputs(config, tmp_path):
  proc = run_main(f"configs/{config}.py:runlocal", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 4
  dims = summary["dims"]
  assert len(summary["top1"]) == len(dims) and all(0 <= a <= 1 for a in summary["top1"])
  for name in ("config.json", "results.json", "results.csv", "results.md", "results.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3, 4]
  assert all(f"train/loss_d{m}" in lines[0] for m in dims)
  assert any(f"val/top1_d{dims[0]}" in l for l in lines)
  assert os.listdir(tmp_path / "tensorboard")
  assert "img/s" in proc.stderr and "ETA" in proc.stderr


def test_command_line_overrides_reach_the_run(tmp_path):
  proc = run_main("configs/demo.py:runlocal", tmp_path, "--config.mrl.mode=mrl_e",
                  "--config.mrl.nesting=(16,64,512)", "--config.total_steps=2",
                  "--config.input.workers=2", "--config.model.dtype=bfloat16",
                  devices=1)  # grain worker processes and bf16 compute too
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dims"] == [16, 64, 512] and summary["steps"] == 2
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["mrl"]["mode"] == "mrl_e"


def test_missing_dataset_fails_fast_with_where_it_looked(tmp_path):
  proc = run_main("configs/vit_jft.py", tmp_path / "w",
                  f"--config.input.data_dir={tmp_path / 'nowhere'}", timeout=120)
  assert proc.returncode != 0
  assert str(tmp_path / "nowhere" / "jft300m") in proc.stderr
  assert ":synthetic" in proc.stderr and "Traceback" not in proc.stderr
  assert "Compiling" not in proc.stderr


@pytest.mark.parametrize("override,fragment", [
    ("--config.mrl.nesting=(8,16,1024)", "exceeds the embedding width 512"),
    ("--config.input.batch_size=12", "multiple of 8"),
    ("--config.mesh.model=3", "not divisible"),
])
def test_impossible_configs_fail_with_a_fix(tmp_path, override, fragment):
  proc = run_main("configs/demo.py:runlocal", tmp_path, override, timeout=120)
  assert proc.returncode != 0
  assert fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_demo_learns_the_real_digits_at_every_dim(tmp_path):
  """A shortened demo (3 epochs at 16x16): every nesting dim far above the 10% chance."""
  proc = run_main("configs/demo.py", tmp_path, "--config.num_epochs=3",
                  "--config.input.image_size=16", devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dims"] == [2, 4, 8, 16, 32, 64, 128, 256, 512]
  assert min(summary["top1"]) > 0.3, summary["top1"]
  assert summary["top1"][-1] > 0.8, summary["top1"]


def test_folder_of_real_images_with_corrupt_files_trains_and_reports_them(tmp_path):
  """A user's own folder through main: corrupt files are skipped, counted and named."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from fashion_folder import write_image_folder  # pylint: disable=import-outside-toplevel
  write_image_folder(tmp_path / "data", "train", 30)
  write_image_folder(tmp_path / "data", "val", 16, offset=30)
  train_class = sorted(os.listdir(tmp_path / "data/train"))[0]
  val_class = sorted(os.listdir(tmp_path / "data/val"))[0]
  (tmp_path / "data/train" / train_class / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
  (tmp_path / "data/val" / val_class / "empty.png").write_bytes(b"")
  proc = run_main("configs/demo.py:runlocal", tmp_path / "w", "--config.input.source=folder",
                  f"--config.input.data_dir={tmp_path / 'data'}",
                  "--config.input.splits.val=val", "--config.total_steps=6",
                  "--config.input.pp_train=decode|inception_crop(32)|flip_lr"
                  "|normalize(imagenet)|mixup(0.2)",
                  "--config.input.pp_eval=decode|resize_small(36)|central_crop(32)"
                  "|normalize(imagenet)", devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Skipped unreadable image #1: " in proc.stderr
  assert f"(id train/{train_class}/broken.jpg)" in proc.stderr
  assert "eval skipped 1 unreadable images" in proc.stderr
  assert f"val/{val_class}/empty.png" in proc.stderr
  lines = [json.loads(l) for l in (tmp_path / "w/metrics.jsonl").read_text().splitlines()]
  assert max(l.get("train/skipped_images", 0) for l in lines) >= 1
  assert [l["val/skipped_images"] for l in lines if "val/skipped_images" in l][-1] == 1
  summary = json.loads((tmp_path / "w/summary.json").read_text())
  assert summary["steps"] == 6 and len(summary["top1"]) == len(summary["dims"])


def test_label_beyond_num_classes_stops_with_the_file_and_the_fix(tmp_path):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from fashion_folder import write_image_folder  # pylint: disable=import-outside-toplevel
  write_image_folder(tmp_path / "data", "train", 60)
  write_image_folder(tmp_path / "data", "val", 10, offset=60)
  proc = run_main("configs/demo.py:runlocal", tmp_path / "w", "--config.input.source=folder",
                  f"--config.input.data_dir={tmp_path / 'data'}",
                  "--config.input.splits.val=val", "--config.num_classes=5", devices=1,
                  timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--config.num_classes=" in proc.stderr
