"""The train-throughput benchmark runs a real sharded step and reports its figures."""

from configs import vit_jft
from mrl_jax.tools import benchmark_train


def test_benchmark_reports_throughput_for_a_multi_label_config():
  config = vit_jft.get_config("runlocal")
  result = benchmark_train.benchmark(config, num_steps=2, warmup=1)
  assert result["img_per_sec"] > 0 and result["step_ms"] > 0
  assert result["devices"].startswith("8 x ")  # the 8-device mesh of the tests
  assert result["batch"] == 16 and result["final_loss"] > 0
