"""Embedding throughput (img/s) of `mrl_jax.inference.Model`, the forward alone and from
JPEG bytes (decode + eval preprocessing + forward), as `embed_folder` runs it.

The model is the config's, freshly initialised (throughput does not depend on
the weights). Prints the device and versions with the figures.

  python -m mrl_jax.tools.benchmark_embed --config=configs/resnet50_i1k.py \
      --config.model.dtype=float32 --batch=64 --batches=5
"""

import io
import json
import time

import flax
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from mrl_jax import cli, experiment, inference, steps

FLAGS = flags.FLAGS


def benchmark(config, batch: int, batches: int, dim: int = 0) -> dict:
  graphdef, params, model_state = steps.split_model(experiment.model_factory(config)())
  model = inference.Model(config, params, model_state, graphdef, step=0, source="init")
  dim = dim or model.dims[-1]
  rng = np.random.default_rng(0)
  # Smooth random photos of ImageNet's typical size, as JPEG files hold them.
  jpegs = []
  for _ in range(batch):
    small = rng.integers(0, 256, (24, 32, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(out, "JPEG", quality=90)
    jpegs.append(out.getvalue())
  preprocessed = model.preprocess(jpegs)
  start = time.perf_counter()
  model.embed_preprocessed(preprocessed, dim, batch_size=batch)
  compile_s = time.perf_counter() - start

  def rate(fn) -> float:
    start = time.perf_counter()
    for _ in range(batches):
      fn()
    return batch * batches / (time.perf_counter() - start)

  forward = rate(lambda: model.embed_preprocessed(preprocessed, dim, batch_size=batch))
  end_to_end = rate(lambda: model.embed(jpegs, dim, batch_size=batch))
  return {"model": f"{config.model.name} {config.model.variant}", "dtype": config.model.dtype,
          "image_size": int(config.input.image_size), "dim": int(dim), "batch": batch,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "jax": jax.__version__, "flax": flax.__version__, "compile_s": round(compile_s, 2),
          "forward_img_per_sec": round(forward, 1),
          "from_jpeg_img_per_sec": round(end_to_end, 1)}


def main(argv) -> None:
  del argv
  print(json.dumps(benchmark(FLAGS.config, FLAGS.batch, FLAGS.batches, FLAGS.dim)), flush=True)


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config (path[:variant]).")
  flags.DEFINE_integer("batch", 64, "Images per forward pass.")
  flags.DEFINE_integer("batches", 5, "Timed batches (after the compiling one).")
  flags.DEFINE_integer("dim", 0, "Trained dim to embed at (0: the largest).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
