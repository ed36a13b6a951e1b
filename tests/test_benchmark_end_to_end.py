"""The end-to-end benchmark: its arithmetic, its generated shards, and the program run as
a user runs it (the real pipeline with a grain worker feeding a tiny ViT's train loop)."""

import filecmp
import json
import os

import pytest
from absl import flags

from mrl_jax.errors import UserError
from mrl_jax.tools import benchmark_end_to_end, synthetic_jpegs
from tests import cli_runner


def test_wait_fraction_is_the_share_of_the_step_the_compute_does_not_explain():
  wait = benchmark_end_to_end.wait_fraction
  assert wait(0.100, 0.125) == pytest.approx(0.2)  # 25 ms of a 125 ms step: no data
  assert wait(0.050, 0.200) == pytest.approx(0.75)
  assert wait(0.100, 0.100) == 0.0
  assert wait(0.100, 0.098) == 0.0  # noise: the end-to-end step a little shorter
  rounds = benchmark_end_to_end.whole_rounds
  assert (rounds(30, 16), rounds(5, 16), rounds(32, 16), rounds(30, 0)) == (32, 16, 32, 30)


def test_the_flags_are_the_ones_it_names():
  # launch/gpu_benchmark.sh is checked against FLAG_NAMES (test_gpu_benchmark_script.py).
  flag_values = flags.FlagValues()
  benchmark_end_to_end._define_flags(flag_values)  # pylint: disable=protected-access
  assert set(flag_values) == set(benchmark_end_to_end.FLAG_NAMES)


def test_shards_do_not_depend_on_the_process_count_and_are_made_once(tmp_path, monkeypatch):
  monkeypatch.setattr(synthetic_jpegs, "SHARD_SIZE", 4)
  one, two = tmp_path / "one", tmp_path / "two"
  made = synthetic_jpegs.write_shards(str(two), 8, num_classes=3, processes=2)
  assert (made["num_shards"], made["reused"]) == (2, False)
  synthetic_jpegs.write_shards(str(one), 8, num_classes=3, processes=1)
  shards = sorted(p for p in os.listdir(one) if p.endswith(".array_record"))
  assert len(shards) == 2 and all(filecmp.cmp(one / p, two / p, shallow=False)
                                  for p in shards)
  mtimes = {p: os.stat(one / p).st_mtime_ns for p in os.listdir(one)}
  again = synthetic_jpegs.write_shards(str(one), 8, num_classes=3)
  assert again["reused"] and {p: os.stat(one / p).st_mtime_ns
                              for p in os.listdir(one)} == mtimes
  fewer = synthetic_jpegs.write_shards(str(one), 4, num_classes=3)  # other arguments: remade
  assert not fewer["reused"] and sorted(os.listdir(one)) == [
      "train-00000-of-00001.array_record", "train.json"]
  meta = json.loads((one / "train.json").read_text())
  meta["source"] = "folder /data/imagenet/train"  # someone's real data: never overwritten
  (one / "train.json").write_text(json.dumps(meta))
  with pytest.raises(UserError, match="not generated here"):
    synthetic_jpegs.write_shards(str(one), 8, num_classes=3)
  (one / "train.json").unlink()  # shards without their metadata: left alone too
  with pytest.raises(UserError, match="no train.json of generated data"):
    synthetic_jpegs.write_shards(str(one), 8, num_classes=3)
  assert sorted(os.listdir(one)) == ["train-00000-of-00001.array_record"]


def _run(data_dir, *flags_):
  proc = cli_runner.run_module(
      "mrl_jax.tools.benchmark_end_to_end", "--config=configs/vit_b16_i1k.py:runlocal",
      f"--data_dir={data_dir}", "--num_images=32", "--steps=2", "--warmup=1", *flags_,
      fast_compile=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.slow
def test_the_program_measures_the_real_loop_and_reuses_its_shards(tmp_path):
  data_dir, out = tmp_path / "shards", tmp_path / "e2e.json"
  proc, result = _run(data_dir, "--workers=1", f"--out={out}")
  assert json.loads(out.read_text()) == result
  assert "Generating 32 ImageNet-like JPEGs" in proc.stderr and "32/32 images" in proc.stderr
  assert result["config"] == "configs/vit_b16_i1k.py:runlocal"
  assert (result["model"], result["batch"], result["workers"]) == ("vit mu/4", 16, 1)
  assert result["devices"] == "1 x cpu" and result["versions"]["jax"] != "n/a"
  assert "mixup_cutmix" in result["pp_train"]  # the config's own preprocessing, batch ops too
  for key in ("e2e", "compute", "pipeline"):
    assert result[f"{key}_img_per_sec"] > 0, key
  assert 0.0 <= result["data_wait_fraction"] <= 1.0
  assert result["slower_side"] in ("input", "compute") and result["nonfinite_steps"] == 0
  shards = result["data"]
  assert (shards["num_images"], shards["num_shards"], shards["reused"]) == (32, 1, False)
  assert shards["mean_record_kb"] > 20  # ImageNet-sized JPEGs
  table = proc.stdout.splitlines()
  assert any(line.startswith("end to end") for line in table)
  assert any(line.startswith("data wait: ") for line in table)
  mtimes = {p: os.stat(data_dir / p).st_mtime_ns for p in os.listdir(data_dir)}

  proc, again = _run(data_dir, "--workers=0", "--config.input.batch_size=8")
  assert again["data"]["reused"] and "Generating" not in proc.stderr
  assert {p: os.stat(data_dir / p).st_mtime_ns for p in os.listdir(data_dir)} == mtimes
  assert (again["batch"], again["workers"]) == (8, 0)
  assert again["config"] == "configs/vit_b16_i1k.py:runlocal --config.input.batch_size=8"
  assert again["e2e_img_per_sec"] > 0 and 0.0 <= again["data_wait_fraction"] <= 1.0
