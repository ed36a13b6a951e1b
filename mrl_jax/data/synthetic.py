"""Synthetic images: for throughput runs and tests, no files needed.

Each class has its own fixed low-frequency pattern and every example adds
noise to it, so a model can learn the task (losses fall, accuracy rises)
while examples are still produced on the fly from (seed, index) alone.
"""

from typing import Any

import numpy as np

from mrl_jax.data import SOURCES


@SOURCES.register("synthetic")
class SyntheticSource:
  """`size` examples of `image_size`² × 3 uint8 images; `multi_label` gives
  multi-hot targets with up to 3 labels each (the JFT shape of the problem)."""

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    self.image_size = int(input_config.image_size)
    self.num_classes = num_classes
    self.multi_label = bool(input_config.multi_label)
    self.size = int(input_config.synthetic_sizes[split])
    self.seed = int(input_config.synthetic_seed) + (0 if split == "train" else 1 << 20)
    coarse = np.random.default_rng(1234).integers(
        0, 256, size=(min(num_classes, 1024), 4, 4, 3), dtype=np.uint8)
    self._templates = coarse  # upsampled per example (nearest) to keep memory small

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int):
    rng = np.random.default_rng((self.seed, index))
    label = index % self.num_classes
    reps = -(-self.image_size // 4)
    template = self._templates[label % len(self._templates)]
    image = np.kron(template, np.ones((reps, reps, 1), np.uint8))[:self.image_size, :self.image_size]
    noise = rng.integers(-48, 48, size=image.shape, dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    if not self.multi_label:
      return {"image": image, "label": np.int32(label), "id": np.int64(index)}
    target = np.zeros((self.num_classes,), np.uint8)
    target[label] = 1
    target[rng.integers(0, self.num_classes, size=rng.integers(0, 3))] = 1
    return {"image": image, "label": target, "id": np.int64(index)}
