"""The bundled real demo data: scikit-learn's 1,797 handwritten digits (8×8, 10 classes).

Shipped inside scikit-learn, so the demo and the tests need no download. The
8×8 images are upscaled in the pipeline to `config.input.image_size`. The
train/val split is a fixed, seeded, class-stratified permutation (20% val).
"""

from typing import Any

import numpy as np

from mrl_jax.data import SOURCES
from mrl_jax.errors import ConfigError

VAL_FRACTION = 0.2


@SOURCES.register("digits")
class DigitsSource:
  """Examples {"image": uint8 [8, 8, 3], "label": int32, "id": int64}."""

  def __init__(self, input_config: Any, split: str, *, num_classes: int):
    from sklearn.datasets import load_digits  # Heavy import, only when used.
    if num_classes != 10:
      raise ConfigError(f"The digits source has 10 classes but config.num_classes="
                       f"{num_classes}; set --config.num_classes=10.")
    if split not in ("train", "val"):
      raise ConfigError(f"The digits source has splits 'train' and 'val', not {split!r}.")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = _stratified_split(digits.target, seed=0)
    ids = order[split]
    self.images = np.repeat(images[ids, :, :, None], 3, axis=-1)
    self.labels = digits.target[ids].astype(np.int32)
    self.ids = ids.astype(np.int64)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int):
    return {"image": self.images[index], "label": self.labels[index], "id": self.ids[index]}


def _stratified_split(labels: np.ndarray, seed: int):
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_val = int(round(len(idx) * VAL_FRACTION))
    val.append(idx[:n_val])
    train.append(idx[n_val:])
  return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}
