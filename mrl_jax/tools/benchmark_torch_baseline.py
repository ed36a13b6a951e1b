"""The PyTorch baseline for `benchmark_train`: the same MRL train step in timm / torchvision.

Run it beside `benchmark_train` on the same GPU to compare the JAX step with a
strong PyTorch one. Both sides do the same work: a ViT-B/16 (timm, stochastic
depth 0.1, cls pooling) or a ResNet50 (torchvision) whose embedding feeds one
linear head per nesting dim (the MRL "separate heads"), the nested softmax
cross-entropy with label smoothing 0.1 summed over dims, and the optimizer of
our config (AdamW + grad-norm clip 1.0 for ViT-B/16, SGD momentum for ResNet50).
Images are a uint8 batch resident on the GPU and normalised inside the step,
as ours are; bf16 autocast with f32 params, channels-last for the ResNet, and
`torch.compile` (the fastest PyTorch setting we know for these models).

It prints one JSON line (peak CUDA memory included); `benchmark_train --sweep` runs
it in a process of its own and shows it as the last row of the sweep's table.

Needs torch, torchvision and timm (not in requirements.txt: this program is
the baseline, not part of mrl_jax):

  python -m mrl_jax.tools.benchmark_torch_baseline --model=vit_b16 --batch_size=256
  python -m mrl_jax.tools.benchmark_torch_baseline --model=resnet50 --batch_size=256
"""

import json
import time

from absl import app, flags

FLAGS = flags.FLAGS
NESTING = {"vit_b16": (12, 24, 48, 96, 192, 384, 768),
           "resnet50": (8, 16, 32, 64, 128, 256, 512, 1024, 2048)}


def _define_flags() -> None:
  flags.DEFINE_enum("model", "vit_b16", sorted(NESTING), "Backbone.")
  flags.DEFINE_integer("batch_size", 256, "Global batch (one GPU).")
  flags.DEFINE_integer("steps", 50, "Timed steps (after warm-up).")
  flags.DEFINE_integer("warmup", 10, "Untimed steps after compilation.")
  flags.DEFINE_bool("compile", True, "torch.compile the step's model.")


def benchmark(model_name: str, batch: int, steps: int, warmup: int, compile_model: bool,
              num_classes: int = 1000, image_size: int = 224) -> dict:
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  device = torch.device("cuda")
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  nesting = NESTING[model_name]

  class MRL(nn.Module):
    def __init__(self):
      super().__init__()
      if model_name == "vit_b16":
        self.backbone = timm.create_model("vit_base_patch16_224", num_classes=0,
                                          drop_path_rate=0.1)
      else:
        self.backbone = torchvision.models.resnet50()
        self.backbone.fc = nn.Identity()
      self.heads = nn.ModuleList(nn.Linear(m, num_classes) for m in nesting)
      self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
      self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, images, labels):
      x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
      if model_name == "resnet50":
        x = x.contiguous(memory_format=torch.channels_last)
      z = self.backbone(x)
      return sum(F.cross_entropy(head(z[:, :m]).float(), labels, label_smoothing=0.1)
                 for m, head in zip(nesting, self.heads))

  model = MRL().to(device)
  if model_name == "resnet50":
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  else:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
  forward = torch.compile(model) if compile_model else model

  def step(images, labels):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = forward(images, labels)
    loss.backward()
    if model_name == "vit_b16":
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  generator = torch.Generator(device=device).manual_seed(0)
  images = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8,
                         device=device, generator=generator)
  labels = torch.randint(0, num_classes, (batch,), device=device, generator=generator)
  start = time.perf_counter()
  step(images, labels)
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    step(images, labels)
  torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step(images, labels)
  torch.cuda.synchronize()
  elapsed = time.perf_counter() - start
  return {"model": f"torch {model_name}", "mode": "mrl", "dtype": "bf16 autocast",
          "batch": batch, "image_size": image_size, "compiled": compile_model,
          "devices": torch.cuda.get_device_name(), "torch": torch.__version__,
          "timm": timm.__version__, "compile_s": round(compile_s, 2),
          "step_ms": round(1000 * elapsed / steps, 2),
          "img_per_sec": round(batch * steps / elapsed, 1), "final_loss": float(loss),
          "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv):
  del argv
  print(json.dumps(benchmark(FLAGS.model, FLAGS.batch_size, FLAGS.steps, FLAGS.warmup,
                             FLAGS.compile)), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
