"""Input-pipeline throughput per CPU core: our train/eval specs against naive pillow.

  python -m mrl_jax.tools.benchmark_input [--num_images=200] [--passes=5] [--image_dir=DIR]
      [--workers=16]

The per-core figures run in one process, so each is images/s for one core. Every
candidate sees the same JPEG bytes (held in memory, so disk speed is not
measured) in the same order with the same random crops and flips; candidates
take turns within each pass, so a noisy neighbour on a shared machine slows
them alike, and the median pass is reported. Without --image_dir, ImageNet-
like JPEGs are generated (mrl_jax/tools/synthetic_jpegs.py): 400–500 × 330–375
pixels, smooth colour fields, blobs, texture and sensor-like noise, quality 90
(~80–100 KB each).

The naive baseline is what a plain torchvision/PIL loader does:
Image.open → convert("RGB") → crop → resize(224, BILINEAR) → flip for
training, and resize(shorter side 256) → centre crop 224 for eval.

With --workers=N it also runs the real grain pipelines (`pipeline.train_iterator`
/ `eval_iterator`: N worker processes, per-example prefetch, batching and
shuffling in the main process) on the same images held in memory, and reports
their images/s: what N cores of a host deliver to the accelerator.
"""

import glob
import io
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import cv2
import numpy as np
import PIL
import simplejpeg
from absl import flags
from PIL import Image

from mrl_jax import cli
from mrl_jax.data import image_ops, preprocess
from mrl_jax.errors import MissingFileError
from mrl_jax.tools import synthetic_jpegs

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 200, "JPEGs to generate (or to read from --image_dir).")
flags.DEFINE_integer("passes", 5, "Timed passes over the images per candidate (median shown).")
flags.DEFINE_integer("quality", 90, "JPEG quality of the generated images (90: ~87 KB, "
                     "80: ~55 KB at the mean 450×350).")
flags.DEFINE_string("image_dir", "", "Read real JPEGs (recursively) from here instead.")
flags.DEFINE_string("json_out", "", "Also write the JSON result to this file.")
flags.DEFINE_integer("workers", 0, "Also measure the grain pipelines with this many worker "
                     "processes (0: skip).")
flags.DEFINE_integer("pipeline_batches", 40, "Batches of 256 per pipeline run (at least "
                     "20 per worker); the second half is timed.")

TRAIN_SPEC = "decode|inception_crop(224)|flip_lr"
EVAL_SPEC = "decode|resize_small(256)|central_crop(224)"
WARMUP_IMAGES = 20


def load_images(image_dir: str, num_images: int, quality: int = 90, seed: int = 0
                ) -> List[bytes]:
  """`num_images` JPEGs from `image_dir` (sorted paths), or generated ones."""
  if not image_dir:
    return synthetic_jpegs.generate(num_images, quality, seed)
  paths = sorted(p for p in glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)
                 if p.lower().endswith((".jpg", ".jpeg")))[:num_images]
  if not paths:
    raise MissingFileError(f"No .jpg/.jpeg files under --image_dir={image_dir}; point it at "
                           "a folder of JPEGs or leave it empty to generate some.")
  images = []
  for path in paths:
    with open(path, "rb") as f:
      images.append(f.read())
  return images


def pillow_train(data: bytes, rng: np.random.Generator) -> np.ndarray:
  image = Image.open(io.BytesIO(data)).convert("RGB")
  top, left, h, w = image_ops.sample_inception_box(image.height, image.width, rng)
  image = image.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(image)


def pillow_eval(data: bytes, rng: np.random.Generator) -> np.ndarray:
  del rng
  image = Image.open(io.BytesIO(data)).convert("RGB")
  h, w = image_ops.resize_small_size(image.height, image.width, 256)
  image = image.resize((w, h), Image.BILINEAR)
  top, left = image_ops.central_crop_offsets(h, w, (224, 224))
  return np.asarray(image.crop((left, top, left + 224, top + 224)))


def candidates() -> Dict[str, Callable[[bytes, np.random.Generator], object]]:
  """name → f(jpeg_bytes, rng); the pillow pair is the baseline of the speedups."""
  train = preprocess.parse(TRAIN_SPEC, num_classes=1)
  evaluate = preprocess.parse(EVAL_SPEC, num_classes=1)
  return {
      "pillow_train": pillow_train,
      "pillow_eval": pillow_eval,
      "mrl_jax_train": lambda data, rng: train({"image": data}, rng),
      "mrl_jax_eval": lambda data, rng: evaluate({"image": data}),
      "decode_pillow": lambda data, rng: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
      "decode_simplejpeg": lambda data, rng: simplejpeg.decode_jpeg(data),
      "decode_opencv": lambda data, rng: cv2.imdecode(np.frombuffer(data, np.uint8),
                                                      cv2.IMREAD_COLOR),
  }


def measure(images: List[bytes], passes: int, seed: int = 0) -> Dict[str, float]:
  """Median images/s of each candidate over `passes` interleaved passes."""
  funcs = candidates()
  for f in funcs.values():  # warm-up: imports, caches, allocator
    rng = np.random.default_rng(seed)
    for data in images[:WARMUP_IMAGES]:
      f(data, rng)
  rates = {name: [] for name in funcs}
  for _ in range(passes):
    for name, f in funcs.items():
      rng = np.random.default_rng(seed)
      start = time.perf_counter()
      for data in images:
        f(data, rng)
      rates[name].append(len(images) / (time.perf_counter() - start))
  return {name: round(statistics.median(r), 1) for name, r in rates.items()}


class InMemorySource:
  """`length` examples cycling over the JPEG bytes: a source for the pipeline runs."""

  def __init__(self, images: List[bytes], length: int):
    self.images, self.length = images, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int):
    return {"image": self.images[index % len(self.images)], "label": 0, "id": index}


def pipeline_rates(images: List[bytes], workers: int, batches: int, batch: int = 256
                   ) -> Dict[str, float]:
  """Images/s of the grain train and eval pipelines with `workers` processes.

  Workers start before the first batch is read and fill read-ahead buffers, so
  the first batches arrive at once; the rate is taken over the second half of
  a run of at least 20 batches per worker, when those are long consumed.
  """
  from mrl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  batches = max(batches, 20 * max(workers, 1))
  rates = {}
  for name, spec in (("train", TRAIN_SPEC), ("eval", EVAL_SPEC)):
    source = InMemorySource(images, batch * batches)
    pp = preprocess.parse(spec, num_classes=1)
    if name == "train":
      iterator = pipeline.train_iterator(source, pp, global_batch=batch, seed=0,
                                         num_classes=1, workers=workers, shard=(0, 1))
    else:
      iterator = pipeline.eval_iterator(source, pp, global_batch=batch, num_classes=1,
                                        workers=workers, shard=(0, 1))
    times = []
    for _ in range(batches):
      next(iterator)
      times.append(time.perf_counter())
    half = batches // 2
    rates[name] = round((batches - 1 - half) * batch / (times[-1] - times[half]), 1)
    close = getattr(iterator, "close", None)
    if close:
      close()
  return rates


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def benchmark(images: List[bytes], passes: int) -> dict:
  dims = [simplejpeg.decode_jpeg_header(data)[:2] for data in images]
  rates = measure(images, passes)
  return {
      "img_per_sec_per_core": rates,
      "speedup_vs_pillow": {
          "train": round(rates["mrl_jax_train"] / rates["pillow_train"], 2),
          "eval": round(rates["mrl_jax_eval"] / rates["pillow_eval"], 2)},
      "train_spec": TRAIN_SPEC, "eval_spec": EVAL_SPEC,
      "num_images": len(images), "passes": passes,
      "mean_kb": round(sum(map(len, images)) / len(images) / 1000, 1),
      "mean_hw": [round(float(np.mean([d[i] for d in dims]))) for i in (0, 1)],
      "cpu": cpu_model(), "cores": os.cpu_count(),
      "versions": {"python": platform.python_version(), "numpy": np.__version__,
                   "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__,
                   "opencv": cv2.__version__}}


def main(argv):
  del argv
  images = load_images(FLAGS.image_dir, FLAGS.num_images, FLAGS.quality)
  result = benchmark(images, FLAGS.passes)
  if FLAGS.workers > 0:
    result["pipeline_img_per_sec"] = pipeline_rates(images, FLAGS.workers,
                                                    FLAGS.pipeline_batches)
    result["pipeline_workers"] = FLAGS.workers
  print(f"{result['num_images']} JPEGs, mean {result['mean_kb']} KB, mean "
        f"{result['mean_hw'][1]}×{result['mean_hw'][0]}; {result['cpu']} "
        f"({result['cores']} cores visible, 1 used); median of {FLAGS.passes} passes")
  print(f"{'candidate':20s} {'img/s/core':>10s}")
  for name, rate in result["img_per_sec_per_core"].items():
    print(f"{name:20s} {rate:10.1f}")
  print(f"speedup vs pillow: train {result['speedup_vs_pillow']['train']}×, "
        f"eval {result['speedup_vs_pillow']['eval']}×")
  if FLAGS.workers > 0:
    rates = result["pipeline_img_per_sec"]
    print(f"grain pipelines with {FLAGS.workers} worker processes: train {rates['train']} "
          f"img/s, eval {rates['eval']} img/s")
  line = json.dumps(result)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  cli.run(main)
