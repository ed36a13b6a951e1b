"""Preprocessing specs and ops, checked against PIL and plain-numpy references on real images.

The images are Fashion-MNIST pictures (Debian's IDX files), tiled and upscaled
to photo-like sizes, then encoded with PIL in every format decode handles.
"""

import gzip
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from mrl_jax.data import image_ops
from mrl_jax.data.preprocess import (CorruptImageError, NORMALIZATIONS, normalize_images,
                                     parse)
from mrl_jax.errors import ConfigError

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def photo():
  """A real RGB image of 375 × 500 (ImageNet's most common size): 3×4 tiles of
  Fashion-MNIST pictures, a different picture per channel, upscaled bicubically."""
  with gzip.open(FASHION, "rb") as f:
    pixels = np.frombuffer(f.read(16 + 36 * 28 * 28)[16:], np.uint8).reshape(36, 28, 28)
  channels = [np.block([[pixels[c * 12 + 4 * r + i] for i in range(4)] for r in range(3)])
              for c in range(3)]
  small = Image.fromarray(np.stack(channels, axis=-1))  # 84 × 112
  return np.asarray(small.resize((500, 375), Image.BICUBIC))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Plain bilinear interpolation with half-pixel centres, in float64."""
  h, w = image.shape[:2]
  ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
  xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  img = image.astype(np.float64)
  top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
  bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


# --- spec parsing -------------------------------------------------------------------------

def test_spec_args_kwargs_bare_identifiers_and_hoisted_normalize(photo):
  pre = parse("decode|inception_crop(96, area_min=0.5, ratio=(3/4, 4/3))|flip_lr|"
              "normalize(imagenet)|mixup(0.2)", num_classes=10)
  assert len(pre.example_ops) == 3 and len(pre.batch_ops) == 1  # normalize is not a host op
  np.testing.assert_allclose(pre.mean, [123.675, 116.28, 103.53])
  np.testing.assert_allclose(pre.std, [58.395, 57.12, 57.375])
  out = pre({"image": encode(Image.fromarray(photo), "PNG"), "label": 3, "id": 7},
            np.random.default_rng(0))
  assert out["image"].shape == (96, 96, 3) and out["label"] == 3 and out["id"] == 7


def test_default_normalization_is_minus_one_one_and_matches_numpy():
  pre = parse("decode|resize(8)", num_classes=10)
  assert pre.mean == (127.5,) * 3 and pre.std == (127.5,) * 3 and pre.batch_ops == []
  images = np.array([[[[0, 255, 127]]]], np.uint8)
  np.testing.assert_allclose(normalize_images(images, pre.mean, pre.std),
                             [[[[-1.0, 1.0, -0.5 / 127.5]]]], atol=1e-6)
  mean, std = NORMALIZATIONS["imagenet"]
  expected = (images[0, 0, 0] - np.array([0.485, 0.456, 0.406]) * 255) / (
      np.array([0.229, 0.224, 0.225]) * 255)
  np.testing.assert_allclose(normalize_images(images, mean, std)[0, 0, 0], expected, rtol=1e-5)
  custom = parse("decode|resize(8)|normalize((120, 110, 100), 60)", num_classes=10)
  assert custom.mean == (120.0, 110.0, 100.0) and custom.std == (60.0,) * 3


@pytest.mark.parametrize("spec, message", [
    ("decode|rotate(30)", "Known preprocessing ops: central_crop"),
    ("decode|resize(1, 2, 3)", "resize(size)"),
    ("decode|inception_crop(224, area=0.5)", "inception_crop(size, area_min=0.08"),
    ("decode|mixup(0.2)|flip_lr", "comes after a batch op"),
    ("decode|resize(224", "Cannot parse"),
    ("decode|resize(os.sep)", "is not a literal"),
    ("decode|normalize(imagenet)|normalize(imagenet)", "two normalize"),
    ("decode|normalize(imagenet_typo)", "known presets"),
    ("decode|normalize((0.48, 0.45, 0.4), (0.23, 0.22, 0.22))", "0..1 units"),
    ("decode|resize(0)", "positive int"),
    ("decode|mixup(0)", "alpha must be > 0"),
    ("decode|cutmix(1.0, num_classes=5)", "comes from config.num_classes"),
])
def test_spec_errors_name_the_problem(spec, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    parse(spec, num_classes=10)


def test_random_ops_without_rng_and_non_square_outputs_are_config_errors(photo):
  with pytest.raises(ConfigError, match="no rng"):
    parse("decode|inception_crop(32)", num_classes=10)({"image": photo})
  with pytest.raises(ConfigError, match="uint8 \\[S, S, 3\\]"):
    parse("decode|resize_small(32)", num_classes=10)({"image": photo})


def test_a_preprocessor_pickles_for_worker_processes(photo):
  spec = "decode|inception_crop(32)|flip_lr|normalize(imagenet)|mixup_cutmix(0.8, 1.0, 0.5)"
  pre = parse(spec, num_classes=10)
  copy = pickle.loads(pickle.dumps(pre))
  assert copy.spec == spec and copy.mean == pre.mean and len(copy.batch_ops) == 1
  example = {"image": photo, "label": 1}
  assert np.array_equal(pre(example, np.random.default_rng(1))["image"],
                        copy(example, np.random.default_rng(1))["image"])


# --- decode -------------------------------------------------------------------------------

def _formats(photo):
  rgb = Image.fromarray(photo)
  gray16 = Image.fromarray((photo[..., 0].astype(np.uint16) * 257 + 100).clip(0, 65535)
                           .astype(np.uint16))
  rgba = Image.fromarray(np.dstack([photo, photo[..., :1]]), "RGBA")
  palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  palette.info["transparency"] = 3
  return {  # name: (encoded bytes, max level difference allowed vs PIL)
      # libjpeg-turbo builds may use different IDCT/upsampling code; allow a few levels.
      "jpeg_rgb": (encode(rgb, "JPEG", quality=90), 3),
      "jpeg_progressive": (encode(rgb, "JPEG", quality=90, progressive=True), 3),
      "jpeg_gray": (encode(rgb.convert("L"), "JPEG", quality=90), 3),
      "jpeg_cmyk": (encode(rgb.convert("CMYK"), "JPEG", quality=90), 3),
      "png_rgb": (encode(rgb, "PNG"), 0),
      "png_gray": (encode(rgb.convert("L"), "PNG"), 0),
      "png_gray_alpha": (encode(rgb.convert("LA"), "PNG"), 0),
      "png_rgba": (encode(rgba, "PNG"), 0),
      "png_palette_transparency": (encode(palette, "PNG"), 0),
      "png_16bit_gray": (encode(gray16, "PNG"), 0),
      "bmp": (encode(rgb, "BMP"), 0),
  }


def test_decode_matches_pil_for_every_format(photo):
  decode = parse("decode|resize(16)", num_classes=10).example_ops[0]
  for name, (data, tolerance) in _formats(photo).items():
    pil = Image.open(io.BytesIO(data))
    if pil.mode == "I;16":  # PIL's own convert("RGB") clips 16-bit values: scale instead
      reference = np.repeat(np.rint(np.asarray(pil) / 257.0)[..., None], 3, -1)
    else:
      reference = np.asarray((pil.convert("RGBA") if pil.mode == "P" else pil).convert("RGB"))
    out = decode({"image": data, "id": name}, None)["image"]
    assert out.dtype == np.uint8 and out.shape == (375, 500, 3), name
    diff = np.abs(out.astype(int) - reference.astype(int)).max()
    assert diff <= tolerance, f"{name}: differs from PIL by {diff} levels"
  # The decoded JPEG is close to the original photo: the formats hold the real image.
  jpeg = decode({"image": _formats(photo)["jpeg_rgb"][0]}, None)["image"]
  assert np.abs(jpeg.astype(int) - photo).mean() < 3


def test_decode_fixes_array_channels(photo):
  decode = parse("decode|resize(16)", num_classes=10).example_ops[0]
  gray = photo[..., 1]
  for image in (gray, gray[..., None]):
    out = decode({"image": image}, None)["image"]
    assert out.shape == (375, 500, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
  rgba = np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)])
  assert np.array_equal(decode({"image": rgba}, None)["image"], photo)
  with pytest.raises(ValueError, match="uint8"):
    decode({"image": photo.astype(np.float32)}, None)


@pytest.mark.parametrize("corruption", ["truncated_jpeg", "truncated_png", "garbage", "empty",
                                        "jpeg_header_only"])
def test_corrupt_bytes_raise_a_short_corrupt_image_error(photo, corruption):
  jpeg = encode(Image.fromarray(photo), "JPEG", quality=90)
  png = encode(Image.fromarray(photo), "PNG")
  data = {"truncated_jpeg": jpeg[:len(jpeg) // 2], "truncated_png": png[:len(png) // 2],
          "garbage": np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes(),
          "empty": b"", "jpeg_header_only": jpeg[:300]}[corruption]
  decode = parse("decode|resize(16)", num_classes=10).example_ops[0]
  with pytest.raises(CorruptImageError, match="example id=42: cannot decode") as info:
    decode({"image": data, "id": 42}, None)
  assert len(str(info.value)) < 400


# --- geometry -----------------------------------------------------------------------------

def test_eval_protocol_matches_a_reference_and_the_hand_computed_crop(photo):
  # 500×375 → shorter side 256: 256 × int(256·500/375) = 256 × 341. Centre 224:
  # top = round(32/2) = 16, left = round(117/2) = round(58.5) = 58 (Python and torchvision
  # both round half to even).
  assert image_ops.resize_small_size(375, 500, 256) == (256, 341)
  assert image_ops.resize_small_size(500, 375, 256) == (341, 256)
  assert image_ops.central_crop_offsets(256, 341, (224, 224)) == (16, 58)
  out = parse("decode|resize_small(256)|central_crop(224)", num_classes=10)({"image": photo})
  image = out["image"]
  assert image.shape == (224, 224, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
  reference = bilinear_reference(photo, 256, 341)[16:240, 58:282]
  assert np.abs(image - reference).max() <= 1  # OpenCV's 11-bit fixed-point weights
  # The same geometry as PIL's pipeline (antialiased, so only close, not equal):
  pil = np.asarray(Image.fromarray(photo).resize((341, 256), Image.BILINEAR)
                   .crop((58, 16, 282, 240))).astype(float)
  shifted = np.asarray(Image.fromarray(photo).resize((341, 256), Image.BILINEAR)
                       .crop((60, 16, 284, 240))).astype(float)
  assert np.abs(image - pil).mean() < 0.5 * np.abs(image - shifted).mean()


def test_shrinking_by_an_integer_factor_is_a_box_average(photo):
  image = np.ascontiguousarray(photo[:300, :400])
  out = image_ops.resize_image(image, (75, 100))  # 4× in both directions
  reference = image.reshape(75, 4, 100, 4, 3).astype(float).mean(axis=(1, 3))
  assert np.abs(out - reference).max() <= 1


def test_inception_box_stays_within_its_area_and_ratio_bounds():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = image_ops.sample_inception_box(375, 500, rng, (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    # w and h are rounded to whole pixels: allow half a pixel on each side.
    assert 0.08 * 375 * 500 <= (h + 0.5) * (w + 0.5) and (h - 0.5) * (w - 0.5) <= 375 * 500
    assert 3 / 4 <= (w + 0.5) / (h - 0.5) and (w - 0.5) / (h + 0.5) <= 4 / 3
  # A 10 × 1000 strip fits no 3/4..4/3 box of ≥ 50% area: the fallback is the central
  # box of height 10 and width round(10·4/3) = 13, at left (1000 - 13) // 2 = 493.
  assert image_ops.sample_inception_box(10, 1000, rng, (0.5, 1.0)) == (0, 493, 10, 13)


def test_inception_crop_resizes_the_sampled_box_and_is_deterministic(photo):
  for size in (224, 64):  # boxes of a 375-pixel-high image shrink < 2× to 224, ≥ 2× to 64
    crop = parse(f"decode|inception_crop({size})", num_classes=10)
    out = crop({"image": photo}, np.random.default_rng(5))["image"]
    again = crop({"image": photo}, np.random.default_rng(5))["image"]
    other = crop({"image": photo}, np.random.default_rng(6))["image"]
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    top, left, h, w = image_ops.sample_inception_box(375, 500, np.random.default_rng(5))
    box = photo[top:top + h, left:left + w]
    if size == 224:  # plain bilinear
      assert np.abs(out - bilinear_reference(box, size, size)).max() <= 1
    else:  # antialiased: close to PIL's exact area average (plain bilinear is ~5× further)
      assert min(h, w) >= 128
      pil = np.asarray(Image.fromarray(box).resize((size, size), Image.BOX))
      assert np.abs(out - pil.astype(float)).mean() < 2


def test_flip_lr_mirrors_about_half_of_the_images_exactly(photo):
  pre = parse("decode|resize(24)|flip_lr", num_classes=10)
  image = np.asarray(Image.fromarray(photo).resize((24, 24)))
  rng = np.random.default_rng(0)
  example = {"image": image, "label": 1}
  flips = 0
  for _ in range(200):
    out = pre(example, rng)["image"]
    assert out.flags.c_contiguous
    if np.array_equal(out, image[:, ::-1]):
      flips += 1
    else:
      assert np.array_equal(out, image)
  assert 70 <= flips <= 130
  assert example["image"] is image  # the input dict is not mutated


# --- batch ops ----------------------------------------------------------------------------

def _batch():
  images = np.stack([np.full((32, 40, 3), 20 * (i + 1), np.uint8) for i in range(4)])
  images[:, 5:9, 7:11] = 255  # some structure that mixes differently per pair
  return {"image": images, "label": np.array([0, 1, 2, 4]), "id": np.arange(4)}


def test_mixup_blends_each_image_with_its_flip_partner():
  batch = _batch()
  pre = parse("decode|mixup(0.4)", num_classes=5)
  out = pre.apply_batch(batch, np.random.default_rng(3))
  lam = np.random.default_rng(3).beta(0.4, 0.4)
  images = batch["image"].astype(np.float64)
  expected = lam * images + (1 - lam) * images[::-1]
  assert out["image"].dtype == np.uint8
  assert np.abs(out["image"] - expected).max() <= 0.5 + 1e-4
  onehot = np.eye(5)[batch["label"]]
  np.testing.assert_allclose(out["label"], lam * onehot + (1 - lam) * onehot[::-1], atol=1e-6)
  np.testing.assert_allclose(out["label"].sum(axis=1), 1.0, atol=1e-6)
  assert out["label"].dtype == np.float32 and np.array_equal(out["id"], batch["id"])
  assert np.array_equal(batch["image"], _batch()["image"])  # input untouched


def test_cutmix_pastes_the_partner_box_and_weights_labels_by_its_area():
  images = np.stack([np.full((32, 40, 3), 20 * (i + 1), np.uint8) for i in range(4)])
  batch = {"image": images, "label": np.array([0, 1, 2, 4])}  # plain images: the box shows
  pre = parse("decode|cutmix(1.0)", num_classes=5)
  areas = []
  for seed in range(5):
    out = pre.apply_batch(batch, np.random.default_rng(seed))
    for i in range(4):
      partner = images[3 - i]
      pasted = np.all(out["image"][i] == partner, axis=-1)
      rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
      area = 0.0
      if rows.size:
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        assert pasted[box].all()  # a full rectangle of the partner's pixels
        area = pasted.sum() / pasted.size
      areas.append(area)
      assert np.array_equal(out["image"][i][~pasted], images[i][~pasted])
      assert out["label"][i, batch["label"][3 - i]] == pytest.approx(area, abs=1e-6)
      assert out["label"][i].sum() == pytest.approx(1.0, abs=1e-6)
  assert max(areas) > 0.05 and np.all(images == images[:, :1, :1])  # input untouched


def test_batch_ops_accept_multi_hot_labels():
  batch = dict(_batch(), label=np.array([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                         [0, 0, 0, 1, 1], [1, 0, 0, 0, 1]]))
  out = parse("decode|mixup_cutmix(0.8, 1.0, 0.5)", num_classes=5).apply_batch(
      batch, np.random.default_rng(0))
  assert out["label"].shape == (4, 5) and out["label"].dtype == np.float32
  np.testing.assert_allclose(out["label"] + out["label"][::-1],
                             batch["label"] + batch["label"][::-1], atol=1e-6)
