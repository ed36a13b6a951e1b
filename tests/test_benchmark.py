"""The train-throughput benchmark runs a real sharded step and reports its figures."""

from configs import vit_jft
from mrl_jax.tools import benchmark_train


def test_benchmark_reports_throughput_for_a_multi_label_config():
  config = vit_jft.get_config("runlocal")
  result = benchmark_train.benchmark(config, num_steps=2, warmup=1)
  assert result["img_per_sec"] > 0 and result["step_ms"] > 0
  assert result["devices"].startswith("8 x ")  # the 8-device mesh of the tests
  assert result["batch"] == 16 and result["final_loss"] > 0


def test_embed_benchmark_reports_the_forward_and_the_jpeg_path():
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mrl_jax.tools import benchmark_embed  # pylint: disable=import-outside-toplevel
  config = demo.get_config("runlocal")
  config.model.options.width = 8
  result = benchmark_embed.benchmark(config, batch=8, batches=1, dim=16)
  assert result["forward_img_per_sec"] > 0 and result["from_jpeg_img_per_sec"] > 0
  assert (result["dim"], result["image_size"]) == (16, 32)
