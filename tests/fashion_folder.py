"""Real image folders for the data tests: Fashion-MNIST images saved as JPEG and PNG files.

Debian's Fashion-MNIST IDX files are parsed with gzip + numpy here, independently
of mrl_jax, so the tests can check labels and bytes against this reference.
"""

import gzip
import os

import numpy as np
from PIL import Image

IDX_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle-boot")  # IDX label order, not sorted


def load_fashion_mnist(count: int, offset: int = 0):
  """(uint8 images [count, 28, 28], IDX labels [count]) from the train files."""
  with gzip.open(os.path.join(IDX_DIR, "train-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(os.path.join(IDX_DIR, "train-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return images[offset:offset + count], labels[offset:offset + count]


def write_image_folder(root, split: str, count: int, offset: int = 0):
  """Writes `count` images to root/split/<class name>/; every 4th one as PNG.

  Returns {path relative to root: IDX label}.
  """
  images, labels = load_fashion_mnist(count, offset)
  written = {}
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(root, split, CLASS_NAMES[label])
    os.makedirs(folder, exist_ok=True)
    ext = "png" if i % 4 == 3 else "jpg"
    name = f"{split}/{CLASS_NAMES[label]}/fm{offset + i:05d}.{ext}"
    Image.fromarray(image).save(os.path.join(root, name), quality=90)
    written[name] = int(label)
  return written


def sorted_label(idx_label: int) -> int:
  """The class id a folder reader must give: the index among sorted folder names."""
  return sorted(CLASS_NAMES).index(CLASS_NAMES[idx_label])
