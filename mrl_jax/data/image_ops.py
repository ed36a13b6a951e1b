"""Example ops on images: decode, inception crop, resizes, central crop, flip (uint8 → uint8).

Libraries, chosen by measurement on one shared AMD EPYC core (ImageNet-like
~87 KB JPEGs of 400–500 × 330–375, quality 90; microseconds per image):

  decode     simplejpeg 820, cv2.imdecode 860, PIL open+convert("RGB") 1070
  resize     463×342 → 224²: cv2 INTER_LINEAR 90, PIL BILINEAR (antialiased) ~1000,
             cv2 INTER_AREA 870 (non-integer factors take its slow general path)
  flip       cv2.flip 28, numpy copy of a reversed view 290

So JPEGs decode with simplejpeg (libjpeg-turbo, strict: truncated files
raise) and everything else with PIL; resizing and flipping use OpenCV.
simplejpeg's CMYK → RGB agrees with PIL's within 2 levels on the Adobe
(inverted) CMYK files PIL writes; CMYK/YCCK JPEGs go to PIL all the same: they
are rare (22 of ImageNet's 1.28M), so the fast path would save nothing
measurable, and PIL handles the Adobe-marker variants of CMYK explicitly.

Quality: INTER_LINEAR reads a 2×2 neighbourhood, fine for upscaling and for
shrinking by less than 2× (all of the ImageNet eval protocol: 375 → 256 is
1.46×; nearly all inception crops of ≤ 500×375 images to 224) but aliases
beyond. A shrink by k ≥ 2× along an axis therefore resizes bilinearly to
exactly k·out (a < 2× step), then averages k×k blocks with INTER_AREA's
integer path. Against PIL's exact area average
(Image.BOX) of a 359×429 crop shrunk to 64²: mean difference 1.05 levels,
INTER_AREA 1.04, plain INTER_LINEAR 4.96; for 900² → 224² it costs 2.0 ms
against INTER_AREA's 2.9 ms (INTER_LINEAR: 0.11 ms; decoding such an image:
~6 ms). EXIF orientation is not applied (as in tf.image.decode_jpeg and
torchvision's PIL loader).

OpenCV runs single-threaded: grain workers are processes, one per core, and
OpenCV's own thread pool would oversubscribe the cores.
"""

import functools
import io
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from mrl_jax.data.op_registry import register_op
from mrl_jax.errors import ConfigError, CorruptImageError

cv2.setNumThreads(1)

JPEG_MAGIC = b"\xff\xd8\xff"
PIL_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_image(data: Any) -> np.ndarray:
  """Encoded bytes or a uint8 array → C-contiguous RGB uint8 [H, W, 3]."""
  if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0:
    data = data.item()  # a bytes scalar as some sources hold it
  if isinstance(data, np.ndarray):
    return to_rgb(data)
  if isinstance(data, (bytearray, memoryview)):
    data = bytes(data)
  if not isinstance(data, bytes):
    raise TypeError(f"decode takes encoded image bytes or a uint8 array, not "
                    f"{type(data).__name__}.")
  jpeg_error = None
  if data[:3] == JPEG_MAGIC:
    try:
      # The rare CMYK/YCCK files go to PIL (see the module docstring).
      if simplejpeg.decode_jpeg_header(data)[2] not in ("CMYK", "YCCK"):
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as e:  # corrupt or truncated, or a JPEG flavour only PIL reads
      jpeg_error = str(e)
  try:
    with Image.open(io.BytesIO(data)) as image:
      return _pil_to_rgb(image)
  except _PIL_ERRORS as e:
    reason = jpeg_error or f"{type(e).__name__}: {e}"
    raise CorruptImageError(f"cannot decode {len(data)} bytes starting {data[:8]!r}: "
                            f"{reason[:200]}") from None


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  if image.mode in PIL_16BIT_MODES:  # convert("RGB") would clip 16-bit values, not scale them
    gray = np.asarray(image).astype(np.float32) / 257.0
    return to_rgb(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # PIL's documented route for palette transparency
  return np.array(image.convert("RGB"))


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W], [H, W, 1|3|4] → [H, W, 3]: gray repeated, alpha dropped."""
  if image.ndim == 2:
    image = image[:, :, None]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f"decode takes uint8 [H, W] or [H, W, 1|3|4] arrays, not {image.dtype} "
                     f"{image.shape}; convert the source's images to uint8 RGB.")
  if image.shape[2] == 1:
    return np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(image[:, :, :3])


def resize_image(image: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
  """Bilinear resize to `size_hw`; shrinking k ≥ 2× along an axis ends in a k-pixel box mean."""
  out_h, out_w = size_hw
  h, w = image.shape[:2]
  if (h, w) == (out_h, out_w):
    return image
  ky, kx = max(1, h // out_h), max(1, w // out_w)
  if max(ky, kx) == 1:
    return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  # Bilinear to exactly (k·out) (a < 2× step), then INTER_AREA's integer path: k×k means.
  image = cv2.resize(image, (kx * out_w, ky * out_h), interpolation=cv2.INTER_LINEAR)
  return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)


def sample_inception_box(height: int, width: int, rng: np.random.Generator,
                         area_range: Tuple[float, float] = (0.08, 1.0),
                         ratio_range: Tuple[float, float] = (3 / 4, 4 / 3)
                         ) -> Tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it.

  10 tries of area ~ U(area_range) × image area and log-uniform aspect w/h;
  if none fits, the central crop of the whole image clamped to `ratio_range`.
  """
  area = height * width
  log_ratio = (math.log(ratio_range[0]), math.log(ratio_range[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio_range):
    w, h = width, int(round(width / min(ratio_range)))
  elif in_ratio > max(ratio_range):
    w, h = int(round(height * max(ratio_range))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def central_crop_offsets(height: int, width: int, size_hw: Tuple[int, int]) -> Tuple[int, int]:
  """(top, left) as torchvision's CenterCrop: int(round((H - h) / 2)), Python's round."""
  return int(round((height - size_hw[0]) / 2.0)), int(round((width - size_hw[1]) / 2.0))


def resize_small_size(height: int, width: int, size: int) -> Tuple[int, int]:
  """(h, w) with the shorter side `size`; the longer is int(size * long / short) (torchvision)."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


# Ops are module-level functions or functools.partial of them, so that a Preprocessor
# pickles (grain worker processes receive it pickled).

def _decode(example: Dict[str, Any], rng=None) -> Dict[str, Any]:
  del rng
  try:
    image = decode_image(example["image"])
  except CorruptImageError as e:
    where = f"example id={example['id']}: " if "id" in example else ""
    raise CorruptImageError(f"{where}{e}") from None
  return dict(example, image=image)


@register_op("decode")
def decode():
  """Encoded bytes (JPEG, PNG, ...) or uint8 arrays → RGB uint8 [H, W, 3]."""
  return _decode


def _inception_crop(example: Dict[str, Any], rng: Optional[np.random.Generator], *,
                    size_hw: Tuple[int, int], area_range: Tuple[float, float],
                    ratio_range: Tuple[float, float]) -> Dict[str, Any]:
  image = example["image"]
  top, left, h, w = sample_inception_box(image.shape[0], image.shape[1],
                                         _need(rng, "inception_crop"), area_range, ratio_range)
  return dict(example, image=resize_image(image[top:top + h, left:left + w], size_hw))


@register_op("inception_crop", "random_resized_crop")
def inception_crop(size: int, area_min: float = 0.08, area_max: float = 1.0,
                   ratio: Sequence[float] = (3 / 4, 4 / 3)):
  """Random crop of area_min..area_max of the image and aspect in `ratio`, resized to size²."""
  size_hw = _size_hw(size, "inception_crop")
  if not 0 < area_min <= area_max <= 1:
    raise ConfigError(f"inception_crop: need 0 < area_min <= area_max <= 1, got "
                      f"{area_min}, {area_max}.")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ConfigError(f"inception_crop: ratio must be (low, high) with 0 < low <= high, "
                      f"got {ratio!r}.")
  return functools.partial(_inception_crop, size_hw=size_hw, area_range=(area_min, area_max),
                           ratio_range=tuple(ratio))


def _resize(example: Dict[str, Any], rng=None, *, size_hw: Tuple[int, int]) -> Dict[str, Any]:
  del rng
  return dict(example, image=resize_image(example["image"], size_hw))


@register_op("resize")
def resize(size: Union[int, Sequence[int]]):
  """Resize to size × size (or (h, w)), ignoring the aspect ratio."""
  return functools.partial(_resize, size_hw=_size_hw(size, "resize"))


def _resize_small(example: Dict[str, Any], rng=None, *, short: int) -> Dict[str, Any]:
  del rng
  image = example["image"]
  return dict(example, image=resize_image(image, resize_small_size(*image.shape[:2], short)))


@register_op("resize_small")
def resize_small(size: int):
  """Resize so that the shorter side is `size`, keeping the aspect ratio (eval: 256)."""
  if not isinstance(size, int):
    raise ConfigError(f"resize_small: size is the shorter side, one int; got {size!r}.")
  return functools.partial(_resize_small, short=_size_hw(size, "resize_small")[0])


def _central_crop(example: Dict[str, Any], rng=None, *, size_hw: Tuple[int, int]
                  ) -> Dict[str, Any]:
  del rng
  image = example["image"]
  h, w = image.shape[:2]
  if h < size_hw[0] or w < size_hw[1]:
    side = max(size_hw)
    raise ConfigError(f"central_crop{size_hw} got a {h}×{w} image; resize it first, e.g. "
                      f"resize_small({side})|central_crop({side}).")
  top, left = central_crop_offsets(h, w, size_hw)
  return dict(example,
              image=np.ascontiguousarray(image[top:top + size_hw[0], left:left + size_hw[1]]))


@register_op("central_crop")
def central_crop(size: Union[int, Sequence[int]]):
  """The central size × size (or (h, w)) crop (eval: 224 after resize_small(256))."""
  return functools.partial(_central_crop, size_hw=_size_hw(size, "central_crop"))


def _flip_lr(example: Dict[str, Any], rng: Optional[np.random.Generator]) -> Dict[str, Any]:
  if _need(rng, "flip_lr").random() < 0.5:
    return dict(example, image=cv2.flip(example["image"], 1))
  return dict(example)


@register_op("flip_lr")
def flip_lr():
  """Mirror left-right with probability 1/2 (training)."""
  return _flip_lr


def _need(rng: Optional[np.random.Generator], op: str) -> np.random.Generator:
  if rng is None:
    raise ConfigError(f"{op} is random and got no rng: use it in the training spec only "
                      "(the eval spec is deterministic).")
  return rng


def _size_hw(size: Union[int, Sequence[int]], op: str) -> Tuple[int, int]:
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                             for v in hw):
    raise ConfigError(f"{op}: size must be a positive int or (height, width), got {size!r}.")
  return hw
