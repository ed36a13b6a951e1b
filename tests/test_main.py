"""The entry point end to end.

In this process, as flax's examples/imagenet/train_test.py does: `train.run`, the whole
run that `python -m mrl_jax.main` makes, for the ViT configs and for the errors raised
before compiling (a `UserError` is what main prints as one `error: …` line and exit 1).
In subprocesses, as a user runs it, where the process is the point: command-line
overrides, the exit code and one-line error, the ResNet configs and a user's folder
(compiled optimised: see IN_PROCESS), and the demo learning the digits."""

import importlib
import json
import logging
import os

import pytest

from configs import demo
from mrl_jax import errors, train
from tests import cli_runner
from tests.fashion_folder import write_image_folder


def run_main(config, workdir, *overrides, timeout=300):
  """`python -m mrl_jax.main` on 1 device (see IN_PROCESS for why)."""
  return cli_runner.run_module("mrl_jax.main", f"--config={config}", f"--workdir={workdir}",
                               *overrides, devices=1, timeout=timeout)


@pytest.fixture(name="log")
def fixture_log(caplog):
  """The run's log lines (absl logs through Python logging), as the CLI prints them."""
  caplog.set_level(logging.INFO)
  return lambda: "\n".join(r.getMessage() for r in caplog.records)


# The ViTs run in this process (train.run, what main runs) on its 8 devices: 12-15 s
# each instead of 22 s as a subprocess. The ResNets run as a subprocess, optimised: this
# process's unoptimised code (tests/cpu_env.py) makes their steps and full-split
# evaluation slow (demo: 144 s in process, 61 s optimised). On 1 device: 8 fake devices
# add 20 s (57 s instead of 37 s, mostly saving the replicated state 8 times) and no
# coverage: meshes are tested in tests/test_sharding.py, the demo ResNet on 2 processes x
# 2 devices in tests/test_multihost.py, an 8-device run here by the ViTs.
IN_PROCESS = {"vit_b16_i1k", "vit_jft"}


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    pytest.param("demo", marks=pytest.mark.e2e),
    pytest.param("resnet50_i1k", marks=pytest.mark.e2e),
    "vit_b16_i1k", "vit_jft"])
def test_runlocal_variant_trains_and_writes_outputs(config, tmp_path, log):
  if config in IN_PROCESS:
    train.run(importlib.import_module(f"configs.{config}").get_config("runlocal"),
              str(tmp_path))
    stderr = log()
  else:
    proc = run_main(f"configs/{config}.py:runlocal", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stderr = proc.stderr
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
  assert "img/s" in stderr and "ETA" in stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_command_line_overrides_reach_the_run(tmp_path):
  # A tuple, strings and numbers from the command line; grain worker processes and bf16.
  # The ViT (z 32 wide): the same command line, a fraction of a ResNet's compile.
  proc = run_main("configs/vit_b16_i1k.py:runlocal", tmp_path, "--config.mrl.mode=mrl_e",
                  "--config.mrl.nesting=(8,16,32)", "--config.total_steps=2",
                  "--config.input.workers=2", "--config.model.dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dims"] == [8, 16, 32] and summary["steps"] == 2
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["mrl"]["mode"] == "mrl_e"


@pytest.mark.e2e
def test_missing_dataset_fails_fast_with_where_it_looked(tmp_path):
  proc = run_main("configs/vit_jft.py", tmp_path / "w",
                  f"--config.input.data_dir={tmp_path / 'nowhere'}", timeout=120)
  assert proc.returncode != 0
  assert str(tmp_path / "nowhere" / "jft300m") in proc.stderr
  assert ":synthetic" in proc.stderr and "Traceback" not in proc.stderr
  assert "Compiling" not in proc.stderr


@pytest.mark.parametrize("field,value,fragment", [
    ("mrl.nesting", (8, 16, 1024), "exceeds the embedding width 512"),
    ("input.batch_size", 12, "multiple of 8"),
    ("mesh.model", 3, "not divisible"),
])
def test_impossible_configs_fail_with_a_fix(tmp_path, field, value, fragment):
  """A UserError is what main prints as one `error: …` line without a traceback
  (test_missing_dataset_fails_fast_with_where_it_looked checks that printing)."""
  config = demo.get_config("runlocal")
  parent, name = field.split(".")
  config[parent][name] = value
  with pytest.raises(errors.UserError, match=fragment):
    train.run(config, str(tmp_path))


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_learns_the_real_digits_at_every_dim(tmp_path):
  """A shortened demo (3 epochs at 16x16): every nesting dim far above the 10% chance."""
  proc = run_main("configs/demo.py", tmp_path, "--config.num_epochs=3",
                  "--config.input.image_size=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dims"] == [2, 4, 8, 16, 32, 64, 128, 256, 512]
  assert min(summary["top1"]) > 0.3, summary["top1"]
  assert summary["top1"][-1] > 0.8, summary["top1"]


@pytest.mark.e2e
@pytest.mark.slow
def test_folder_of_real_images_with_corrupt_files_trains_and_reports_them(tmp_path):
  """A user's own folder through main: corrupt files are skipped, counted and named."""
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
                  "|normalize(imagenet)")
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
  """Raised before compiling, as a UserError: main's one line (see test_impossible_...)."""
  write_image_folder(tmp_path / "data", "train", 60)
  write_image_folder(tmp_path / "data", "val", 10, offset=60)
  config = demo.get_config("runlocal")
  config.input.source, config.input.data_dir = "folder", str(tmp_path / "data")
  config.input.splits.val, config.num_classes = "val", 5
  with pytest.raises(errors.UserError, match="--config.num_classes="):
    train.run(config, str(tmp_path / "w"))
